/* gpu_bench.c: a standalone driver for the GPU engine (leankv.cu), until the command line of
 * leankv.c grows --device. It reuses the CPU reference by including leankv.c whole.
 *
 *   leankv-gpu-bench check MODEL  GPU vs CPU logits at every step of a prompt + generation
 *   leankv-gpu-bench batch MODEL  many requests: alone vs batched vs a pool small enough to
 *                                 force preemption; the greedy outputs must all agree
 *   leankv-gpu-bench bench MODEL  synthetic throughput (prefill, decode, total tok/s)
 *   leankv-gpu-bench attn none    decode attention alone, each cache type, CUDA events
 *   leankv-gpu-bench tiers none   leankv's two tiers: the GPU's cache against the CPU's from
 *                                 the same inputs (tables, counts, page bytes, scores)
 *   leankv-gpu-bench quant none   the device's write path against the CPU's kv_store, byte for
 *                                 byte, and its attention kernel against dense fp32 attention
 *                                 over the dequantized values, for every cache type
 *
 * MODEL is a model.bin, or "random" for random weights of SmolLM2-135M's shape (no file, no
 * tokenizer: enough for speed, and for GPU vs CPU since both run the same weights).
 * Options: --prompt-len N --gen-len N --batch N --requests N --chunk N --kv-mem MIB --runs N
 *          --ctx N (bench: build the engine for N tokens, as the command line's 4096 default;
 *          check: --batch N builds the engine for N sequences and checks one, in longer splits)
 *          --seed N --kv TYPE --kv-groups G --tol X --match N --tol-quant F (check: largest
 *          relative logit error, greedy steps that must agree, and for a quantized cache the
 *          largest mean error as a multiple of what quantization itself does to the CPU's;
 *          an fp16 cache has no such error of its own, so --tol-quant does not apply there) */
#define TESTING
#include "../leankv.c"

/* ----------------------------------------------------------------------------------------
 * Options and the model */

typedef struct {
    const char *mode, *model;
    int prompt_len, gen_len, batch, requests, chunk, runs;
    size_t kv_mem_mib;
    int ctx;             /* bench: the engine's context, if more than prompt + generated */
    uint64_t seed;
    LkvPrecision kv;     /* --kv, --kv-groups */
    double tol;          /* check: the largest relative logit error that passes */
    int match;           /* check: greedy steps that must agree (default 33) */
    double tol_quant;    /* check, quantized cache: GPU-CPU mean error / quantization's own */
} BenchOptions;

static uint64_t rng_state = 42;
static uint32_t rng_u32(void) {   /* xorshift64* */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rng_uniform(void) { return (rng_u32() >> 8) / 16777216.0f * 2.0f - 1.0f; }

/* uniform values of standard deviation std, rounded to fp16 so that the CPU (fp32) and the
 * GPU (fp16 weights) compute with the same numbers and only the arithmetic differs */
static float *random_tensor(size_t n, float std, float constant) {
    float *p = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = constant != 0.0f ? constant : lkv_h2f(lkv_f2h(rng_uniform() * std * 1.7320508f));
    return p;
}

/* SmolLM2-135M's shape: dim 576, hidden 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152 */
static void build_random_model(Model *m) {
    memset(m, 0, sizeof *m);
    Config *c = &m->c;
    c->dim = 576; c->hidden_dim = 1536; c->n_layers = 30; c->n_heads = 9; c->n_kv_heads = 3;
    c->head_dim = 64; c->vocab_size = 49152; c->seq_len = 8192; c->rope_theta = 100000.0f;
    c->rope_style = LKV_ROPE_HALF; c->norm_eps = 1e-5f; c->tied = 1; c->bos_id = 1;
    c->eos_id = 2; c->n_stop = 0;
    int D = c->dim, H = c->hidden_dim, QD = c->n_heads * c->head_dim,
        KVD = c->n_kv_heads * c->head_dim;
    Weights *w = &m->w;
    w->tok_embeddings = random_tensor((size_t)c->vocab_size * D, 0.1f, 0);
    w->layers = xmalloc(c->n_layers * sizeof(LayerWeights));
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
        L->attn_norm = random_tensor(D, 0, 1.0f);
        L->ffn_norm = random_tensor(D, 0, 1.0f);
        L->wq = random_tensor((size_t)QD * D, 1.0f / sqrtf(D), 0);
        L->wk = random_tensor((size_t)KVD * D, 1.0f / sqrtf(D), 0);
        L->wv = random_tensor((size_t)KVD * D, 1.0f / sqrtf(D), 0);
        L->wo = random_tensor((size_t)D * QD, 0.5f / sqrtf(QD), 0);
        L->w1 = random_tensor((size_t)H * D, 1.0f / sqrtf(D), 0);
        L->w3 = random_tensor((size_t)H * D, 1.0f / sqrtf(D), 0);
        L->w2 = random_tensor((size_t)D * H, 0.5f / sqrtf(H), 0);
    }
    w->norm = random_tensor(D, 0, 1.0f);
    w->output = w->tok_embeddings;
}

static void load_model(Model *m, const char *path) {
    if (!strcmp(path, "random")) build_random_model(m);
    else build_model(m, path, NULL);
}

static GpuEngine *gpu_engine(Model *m, LkvPrecision kv, int slots, int chunk, int ctx,
                             size_t kv_mem_mib) {
    char err[256];
    LkvPolicy pol = {1.0f, 0.02f, 64, 0};
    GpuEngine *g = gpu_build(&m->c, &m->w, &kv, 1, pol, slots, chunk, ctx, kv_mem_mib, err,
                             sizeof err);
    if (!g) die("GPU: %s", err);
    return g;
}

static void random_ids(int *ids, int n, int vocab) {
    for (int i = 0; i < n; i++) ids[i] = (int)(rng_u32() % (uint32_t)vocab);
}

/* ----------------------------------------------------------------------------------------
 * check: the CPU reference and the GPU see the same tokens (the CPU's greedy choices); at each
 * step compare the logits (relative L2 error) and the greedy token. */

static int gpu_mode_check(Model *m, const BenchOptions *o) {
    Config *c = &m->c;
    int P = o->prompt_len, G = o->gen_len, T = P + G, V = c->vocab_size;
    build_runstate(m, T + 1, 1);   /* forward() only: one row */
    KVCache kv;
    build_kvcache(&kv, c, 1, T + 1, 0, o->kv);   /* the GPU's cache type */
    int *seq = xmalloc((T + 1) * sizeof(int));
    random_ids(seq, P, V);
    float *cpu = xmalloc((size_t)T * V * sizeof(float)), *gpu = xmalloc((size_t)T * V * sizeof(float));
    double t0 = now_s();
    for (int t = 0; t < T; t++) {
        reserve_or_die(&kv, 0, t + 1);
        float *lg = forward(m, &kv, 0, seq[t], t);
        memcpy(cpu + (size_t)t * V, lg, V * sizeof(float));
        if (t + 1 >= P) seq[t + 1] = argmax(lg, V);
    }
    fprintf(stderr, "check: CPU reference %d steps in %.1f s\n", T, now_s() - t0);
    /* a quantized cache: how far quantization itself moves the CPU's logits (the same tokens
     * through an fp16 cache), the scale against which the GPU's distance is judged */
    double q_mean = 0.0;
    int quantized = o->kv.kbits < 16 || o->kv.vbits < 16;
    if (quantized) {
        KVCache ref;
        build_kvcache(&ref, c, 1, T + 1, 0, (LkvPrecision){16, 16, 1});
        for (int t = 0; t < T; t++) {
            reserve_or_die(&ref, 0, t + 1);
            float *lg = forward(m, &ref, 0, seq[t], t);
            double num = 0, den = 0;
            for (int i = 0; i < V; i++) {
                double d = (double)lg[i] - cpu[(size_t)t * V + i];
                num += d * d;
                den += (double)cpu[(size_t)t * V + i] * cpu[(size_t)t * V + i];
            }
            q_mean += sqrt(num / (den + 1e-30)) / T;
        }
        free_kvcache(&ref);
    }

    /* an engine for o->batch sequences, of which the check runs one: more slots, longer
     * attention splits (splits are cut to fill the GPU when every slot is busy) */
    GpuEngine *g = gpu_engine(m, o->kv, o->batch, o->chunk, T + 1, 64);
    int next, first_bad = -1;
    if (gpu_prefill(g, 0, seq, P, &next, gpu) != 0) die("GPU prefill failed");
    int *gtok = xmalloc(T * sizeof(int));
    gtok[P - 1] = next;
    for (int t = P; t < T; t++) {
        int slot = 0;
        if (gpu_decode(g, 1, &slot, &seq[t], &gtok[t], gpu + (size_t)t * V) != 0)
            die("GPU decode failed at step %d", t);
    }
    double max_err = 0, sum_err = 0;
    for (int t = 0; t < T; t++) {
        double num = 0, den = 0;
        for (int i = 0; i < V; i++) {
            double d = (double)gpu[(size_t)t * V + i] - cpu[(size_t)t * V + i];
            num += d * d;
            den += (double)cpu[(size_t)t * V + i] * cpu[(size_t)t * V + i];
        }
        double e = sqrt(num / (den + 1e-30));
        if (!(e <= max_err)) max_err = e;   /* NaN propagates */
        sum_err += e;
        if (t >= P - 1) {   /* greedy steps: the token after the prompt and every generated one */
            int ga = argmax(gpu + (size_t)t * V, V);
            if (t >= P && ga != gtok[t]) die("GPU argmax kernel disagrees with its logits at %d", t);
            if (first_bad < 0 && ga != argmax(cpu + (size_t)t * V, V)) first_bad = t - (P - 1);
        }
    }
    int match = first_bad < 0 ? G + 1 : first_bad;
    printf("check: k%dv%d, %d prompt + %d generated steps, chunk %d: logits rel err max %.3e "
           "mean %.3e; greedy tokens identical for the first %d of %d steps\n", o->kv.kbits,
           o->kv.vbits, P, G, o->chunk, max_err,
           sum_err / T, match, G + 1);
    gpu_free(g);
    if (quantized)
        printf("check: quantization itself (CPU k%dv%d vs CPU fp16 cache): mean rel err %.3e; "
               "GPU vs CPU mean / that = %.2f\n", o->kv.kbits, o->kv.vbits, q_mean,
               sum_err / T / q_mean);
    int ok = max_err <= o->tol && match >= (G + 1 < o->match ? G + 1 : o->match) &&
             (o->tol_quant <= 0 || !quantized || sum_err / T <= o->tol_quant * q_mean);
    printf("check: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}

/* ----------------------------------------------------------------------------------------
 * batch: n requests with prompts of different lengths, greedy, a fixed number of new tokens.
 * run_requests is a small continuous-batching scheduler over the engine's API: a request joins
 * when a slot and the pages of its prompt are free, leaves (freeing its pages) when done, and
 * when a decode step lacks pages the latest-admitted request is preempted: its pages are
 * freed and it goes back to the front of the queue, to be recomputed from its prompt and the
 * tokens it already generated. */

typedef struct {
    int *prompt, n_prompt;
    int *out, n_out;        /* generated tokens */
    int slot;               /* -1 when not running */
    long admitted;          /* admission order, for choosing whom to preempt */
} GpuRequest;

static int run_requests(GpuEngine *g, GpuRequest *rq, int n, int max_batch, int gen, int *peak) {
    GpuInfo info;
    gpu_info(g, &info);
    int *queue = xmalloc(n * sizeof(int)), qh = 0, qn = n;   /* waiting requests, FIFO */
    for (int i = 0; i < n; i++) { queue[i] = i; rq[i].slot = -1; rq[i].n_out = 0; }
    int *slot_free = xmalloc(max_batch * sizeof(int));
    for (int i = 0; i < max_batch; i++) slot_free[i] = 1;
    int *run = xmalloc(max_batch * sizeof(int)), n_run = 0, preemptions = 0, done = 0;
    int *slots = xmalloc(max_batch * sizeof(int)), *toks = xmalloc(max_batch * sizeof(int)),
        *next = xmalloc(max_batch * sizeof(int));
    int *ctx = xmalloc((size_t)info.ctx * sizeof(int));
    long clock = 0;
    *peak = 0;
    while (done < n) {
        /* admit: prompt plus what was generated before a preemption, recomputed in one prefill */
        while (qn > 0 && n_run < max_batch) {
            GpuRequest *r = &rq[queue[qh]];
            int s = 0;
            while (!slot_free[s]) s++;
            int len = r->n_prompt + r->n_out;
            GpuInfo now;
            gpu_info(g, &now);
            if (gpu_pages_needed(g, s, len) > now.free_pages) break;
            memcpy(ctx, r->prompt, r->n_prompt * sizeof(int));
            memcpy(ctx + r->n_prompt, r->out, r->n_out * sizeof(int));
            int nx;
            if (gpu_prefill(g, s, ctx, len, &nx, NULL) != 0) die("prefill failed after the check");
            r->out[r->n_out++] = nx;
            slot_free[s] = 0; r->slot = s; r->admitted = clock++;
            run[n_run++] = queue[qh];
            qh = (qh + 1) % n; qn--;
        }
        if (n_run == 0) die("request %d alone does not fit the pool", queue[qh]);
        if (n_run > *peak) *peak = n_run;
        /* leave: finished requests free their slot and pages at once */
        for (int i = 0; i < n_run;) {
            GpuRequest *r = &rq[run[i]];
            if (r->n_out >= gen) {
                gpu_release(g, r->slot); slot_free[r->slot] = 1; r->slot = -1; done++;
                run[i] = run[--n_run];
            } else i++;
        }
        if (n_run == 0) continue;
        /* preempt until the step fits: the latest admitted goes back to the queue's front */
        for (;;) {
            int need = 0;
            for (int i = 0; i < n_run; i++) need += gpu_pages_needed(g, rq[run[i]].slot, 1);
            GpuInfo now;
            gpu_info(g, &now);
            if (need <= now.free_pages) break;
            int v = 0;
            for (int i = 1; i < n_run; i++) if (rq[run[i]].admitted > rq[run[v]].admitted) v = i;
            GpuRequest *r = &rq[run[v]];
            gpu_release(g, r->slot); slot_free[r->slot] = 1; r->slot = -1;
            qh = (qh - 1 + n) % n; queue[qh] = run[v]; qn++;
            run[v] = run[--n_run];
            preemptions++;
            if (n_run == 0) die("one request alone outgrows the pool");
        }
        for (int i = 0; i < n_run; i++) {
            slots[i] = rq[run[i]].slot;
            toks[i] = rq[run[i]].out[rq[run[i]].n_out - 1];
        }
        if (gpu_decode(g, n_run, slots, toks, next, NULL) != 0) die("decode failed after the check");
        for (int i = 0; i < n_run; i++) rq[run[i]].out[rq[run[i]].n_out++] = next[i];
    }
    free(queue); free(slot_free); free(run); free(slots); free(toks); free(next); free(ctx);
    return preemptions;
}

static int gpu_mode_batch(Model *m, const BenchOptions *o) {
    int n = o->requests, G = o->gen_len, maxp = o->prompt_len;
    GpuRequest *rq = xmalloc(n * sizeof(GpuRequest));
    int **ref = xmalloc(n * sizeof(int *));
    for (int i = 0; i < n; i++) {
        rq[i].n_prompt = 8 + (int)(rng_u32() % (uint32_t)(maxp - 7));
        rq[i].prompt = xmalloc(rq[i].n_prompt * sizeof(int));
        random_ids(rq[i].prompt, rq[i].n_prompt, m->c.vocab_size);
        rq[i].out = xmalloc((G + 1) * sizeof(int));
        ref[i] = xmalloc(G * sizeof(int));
    }
    int ctx = maxp + G + 1, peak, fails;
    LkvPageLayout L;
    int page_bytes = lkv_page_bytes(&o->kv, 1, m->c.head_dim, NULL);
    int tpp = lkv_layout_fit(&L, o->kv, m->c.head_dim, page_bytes, 0);
    long need = 0;   /* pages to hold every request at once */
    for (int i = 0; i < n; i++) need += (rq[i].n_prompt + G + tpp - 1) / tpp;
    need *= m->c.n_layers * m->c.n_kv_heads;

    /* 1. each request alone: a batch of one */
    GpuEngine *g = gpu_engine(m, o->kv, n, o->chunk, ctx, (size_t)(need * 2 * page_bytes >> 20) + 1);
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        run_requests(g, &rq[i], 1, 1, G, &peak);
        memcpy(ref[i], rq[i].out, G * sizeof(int));
    }
    double t_alone = now_s() - t0;

    /* 2. all at once */
    t0 = now_s();
    int pre = run_requests(g, rq, n, n, G, &peak);
    double t_batch = now_s() - t0;
    fails = 0;
    for (int i = 0; i < n; i++) fails += memcmp(ref[i], rq[i].out, G * sizeof(int)) != 0;
    printf("batch: %d requests (prompts 8..%d tokens, %d generated): batched vs alone: %d of %d "
           "differ; peak %d in flight, %d preemptions; %.2f s alone, %.2f s batched\n", n, maxp,
           G, fails, n, peak, pre, t_alone, t_batch);
    gpu_free(g);

    /* 3. a pool of a quarter of what the batch needs: preemption must keep every request */
    GpuInfo info;
    size_t mib = (size_t)(need / 4 * page_bytes >> 20) + 1;
    g = gpu_engine(m, o->kv, n, o->chunk, ctx, o->kv_mem_mib ? o->kv_mem_mib : mib);
    gpu_info(g, &info);
    pre = run_requests(g, rq, n, n, G, &peak);
    int fails_small = 0;
    for (int i = 0; i < n; i++) fails_small += memcmp(ref[i], rq[i].out, G * sizeof(int)) != 0;
    printf("batch: small pool (%d pages, %ld needed for all at once): %d preemptions, peak %d in "
           "flight, every request completed; %d of %d differ from alone\n", info.n_pages, need,
           pre, peak, fails_small, n);
    gpu_free(g);
    int ok = fails == 0 && fails_small == 0 && pre > 0;
    printf("batch: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}

/* ----------------------------------------------------------------------------------------
 * bench: --requests prompts of --prompt-len random ids, served --batch at a time; each makes
 * exactly --gen-len tokens (the first from its prefill). Median over --runs. */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int gpu_mode_bench(Model *m, const BenchOptions *o) {
    Config *c = &m->c;
    int B = o->batch, P = o->prompt_len, G = o->gen_len, R = o->requests ? o->requests : B;
    int chunk = P < o->chunk ? P : o->chunk;
    /* the context the engine is built for: what the run needs, or --ctx (the command line's
     * default is 4096: a decode graph's attention spans it) */
    int ctx = o->ctx > P + G ? o->ctx : P + G;
    GpuEngine *g = gpu_engine(m, o->kv, B, chunk, ctx, o->kv_mem_mib);
    char name[256];
    gpu_available(name, sizeof name);
    double copy_gbs = gpu_copy_bandwidth();
    int *prompts = xmalloc((size_t)R * P * sizeof(int));
    random_ids(prompts, R * P, c->vocab_size);
    int *slots = xmalloc(B * sizeof(int)), *tok = xmalloc(B * sizeof(int));
    GpuInfo info;
    gpu_info(g, &info);
    int runs = o->runs, min_free = info.n_pages;
    double *pre = xmalloc(runs * sizeof(double)), *dec = xmalloc(runs * sizeof(double)),
           *tot = xmalloc(runs * sizeof(double)), *step = xmalloc(runs * sizeof(double));
    for (int run = -1; run < runs; run++) {   /* run -1 warms up: graphs, cuBLAS heuristics */
        double t_pre = 0, t_dec = 0;
        long n_dec = 0, n_steps = 0;
        for (int w0 = 0; w0 < R; w0 += B) {
            int nb = R - w0 < B ? R - w0 : B;
            double t0 = now_s();
            for (int i = 0; i < nb; i++) {
                slots[i] = i;
                if (gpu_prefill(g, i, prompts + (size_t)(w0 + i) * P, P, &tok[i], NULL) != 0)
                    die("bench: the pool is too small for %d x %d tokens (--kv-mem)", nb, P + G);
            }
            double t1 = now_s();
            for (int s = 1; s < G; s++) {
                if (gpu_decode(g, nb, slots, tok, tok, NULL) != 0) die("bench: pool full");
                n_dec += nb;
                n_steps++;
            }
            double t2 = now_s();
            gpu_info(g, &info);
            if (info.free_pages < min_free) min_free = info.free_pages;
            for (int i = 0; i < nb; i++) gpu_release(g, i);
            t_pre += t1 - t0;
            t_dec += t2 - t1;
        }
        if (run < 0) continue;
        pre[run] = (double)R * P / t_pre;
        dec[run] = n_dec / t_dec;
        tot[run] = ((double)R * P + (double)R * G) / (t_pre + t_dec);
        step[run] = t_dec / n_steps;
    }
    qsort(pre, runs, sizeof(double), cmp_double); qsort(dec, runs, sizeof(double), cmp_double);
    qsort(tot, runs, sizeof(double), cmp_double); qsort(step, runs, sizeof(double), cmp_double);
    double p50 = pre[runs / 2], d50 = dec[runs / 2], t50 = tot[runs / 2], s50 = step[runs / 2];
    /* bytes one decode step must move: every fp16 weight matrix once, the classifier, and the
     * K and V of every cached token of every sequence (at the average length P + G/2) */
    double D = c->dim, H = c->hidden_dim, QD = c->n_heads * c->head_dim,
           KVD = c->n_kv_heads * c->head_dim, V = c->vocab_size;
    double wbytes = 2.0 * (c->n_layers * ((QD + 2 * KVD) * D + D * QD + 3 * H * D) + V * D);
    LkvPrecision p = o->kv;
    double tok_bytes = lkv_code_bytes(c->head_dim, p.kbits) + lkv_sz_bytes(p.groups, p.kbits) +
                       lkv_code_bytes(c->head_dim, p.vbits) + lkv_sz_bytes(p.groups, p.vbits);
    double kvbytes = (double)(R < B ? R : B) * (P + G / 2.0) * c->n_layers * c->n_kv_heads * tok_bytes;
    double bw = (wbytes + kvbytes) / s50 / 1e9;
    int pages_used = info.n_pages - min_free;
    printf("bench: %s, k%dv%d, batch %d, prompt %d, generate %d, %d requests, median of %d runs\n",
           name, p.kbits, p.vbits, B, P, G, R, runs);
    printf("  prefill   %10.0f tok/s\n  decode    %10.0f tok/s  (%.3f ms a step)\n"
           "  total     %10.0f tok/s\n  peak      %d sequences in flight, %d of %d KV pages\n"
           "  decode step moves %.0f MB (weights %.0f, KV %.0f): %.0f GB/s = %.2f of the copy "
           "bandwidth (%.0f GB/s)\n", p50, d50, s50 * 1e3, t50, R < B ? R : B, pages_used,
           info.n_pages, (wbytes + kvbytes) / 1e6, wbytes / 1e6, kvbytes / 1e6, bw, bw / copy_gbs,
           copy_gbs);
    printf("{\"device\": \"%s\", \"kv\": \"k%dv%d\", \"batch\": %d, \"prompt_len\": %d, \"gen_len\": %d, "
           "\"requests\": %d, \"runs\": %d, \"prefill_tok_s\": %.0f, \"decode_tok_s\": %.0f, "
           "\"total_tok_s\": %.0f, \"decode_step_ms\": %.4f, \"peak_seqs\": %d, "
           "\"kv_pages_used\": %d, \"kv_pages\": %d, \"decode_gb_s\": %.0f, \"copy_gb_s\": %.0f, "
           "\"bw_fraction\": %.3f}\n", name, p.kbits, p.vbits, B, P, G, R, runs, p50, d50, t50, s50 * 1e3,
           R < B ? R : B, pages_used, info.n_pages, bw, copy_gbs, bw / copy_gbs);
    gpu_free(g);
    return 0;
}

/* ----------------------------------------------------------------------------------------
 * quant: for head dims 64 and 128, every cache type the GPU serves and 1, 2 or 4 groups,
 *   1. the same keys and values stored by the CPU (kv_store) and by the device (kv_append)
 *      give byte-identical pages: codes, scales, zeros (a one-tier page keeps no scores or positions);
 *   2. the device's attention over those pages, in one split and in splits of one page,
 *      agrees with dense attention in double precision over the dequantized values
 *      (lkv_dequantize of the CPU's pages): max |o - ref| <= 2e-3 max |ref| (the kernel's
 *      output is fp16: 4.9e-4 relative rounding, plus fp32 sums and __expf).
 * The vectors mix the awkward cases of test_quant.c: gaussian rows, constants, one outlier,
 * all negative, ranges near fp16's smallest step, large values, signed zeros. */

static void fill_vector(float *x, int d, int kind) {
    float mag = 0.25f + 4.0f * (rng_u32() % 1000) / 1000.0f;
    for (int j = 0; j < d; j++) {
        float u = rng_uniform() + rng_uniform() + rng_uniform();   /* about gaussian */
        switch (kind % 8) {
        case 0: case 1: case 2: x[j] = u * mag; break;
        case 3: x[j] = 1.5f; break;                                   /* constant */
        case 4: x[j] = j == d / 3 ? 40.0f : u * 0.1f; break;          /* one outlier */
        case 5: x[j] = -3.0f - fabsf(u); break;                       /* all negative */
        case 6: x[j] = 1e-3f + u * 1e-7f; break;                      /* a tiny range */
        case 7: x[j] = j % 2 ? -0.0f : 0.0f; break;                   /* signed zeros */
        }
    }
}

/* dense attention in double of gq query heads q (gq, hd) over n tokens of k, v (n, hd) into
 * ref (gq, hd) */
static void dense_attention(const float *q, const float *k, const float *v, int n, int gq, int hd,
                            double *ref) {
    double *a = xmalloc(n * sizeof(double));
    for (int h = 0; h < gq; h++) {
        double mx = -1e300, sum = 0.0;
        for (int t = 0; t < n; t++) {
            double s = 0.0;
            for (int j = 0; j < hd; j++) s += (double)q[h * hd + j] * k[(size_t)t * hd + j];
            a[t] = s / sqrt((double)hd);
            if (a[t] > mx) mx = a[t];
        }
        for (int t = 0; t < n; t++) { a[t] = exp(a[t] - mx); sum += a[t]; }
        for (int j = 0; j < hd; j++) {
            double acc = 0.0;
            for (int t = 0; t < n; t++) acc += a[t] / sum * v[(size_t)t * hd + j];
            ref[h * hd + j] = acc;
        }
    }
    free(a);
}

/* the largest |o - ref| over m values, relative to the largest |ref|, or to 2^-15 when all are
 * smaller (NaN sticks): the kernels write fp16, whose values below 2^-14 are rounded at a fixed
 * step of 2^-24, 5e-4 of 2^-15 -- a row whose weight sits on tokens of zero value can have an
 * output of 1e-5, and its fp16 rounding alone would be 4e-3 of it */
static double max_rel_err(const float *o, const double *ref, int m) {
    double e = 0.0, ref_max = 0.0;
    for (int i = 0; i < m; i++) {
        double d = fabs(o[i] - ref[i]);
        if (!(d <= e)) e = d;
        if (fabs(ref[i]) > ref_max) ref_max = fabs(ref[i]);
    }
    return e / (ref_max > 0x1p-15 ? ref_max : 0x1p-15);
}

static int gpu_mode_quant(void) {
    static const int pairs[][2] = {{16, 16}, {16, 8}, {16, 4}, {16, 2}, {8, 8}, {8, 4}, {8, 2},
                                   {4, 4}, {4, 2}, {2, 2}};
    int failures = 0, cases = 0, prompt_cases = 0;
    double worst_att = 0.0;
    for (int hd = 64; hd <= 128; hd += 64)
        for (size_t pi = 0; pi < sizeof pairs / sizeof pairs[0]; pi++)
            for (int groups = 1; groups <= 4; groups *= 2) {
                LkvPrecision p = {pairs[pi][0], pairs[pi][1], groups};
                if (p.kbits == 16 && p.vbits == 16 && groups > 1) continue;
                LkvPageLayout L;
                int page_bytes = lkv_page_bytes(&p, 1, hd, NULL);
                int tpp = lkv_layout_fit(&L, p, hd, page_bytes, 0);   /* one tier: no scores */
                int n = 2 * tpp + 5, n_pages = (n + tpp - 1) / tpp;
                size_t bytes = (size_t)n_pages * page_bytes;
                float *k = xmalloc((size_t)n * hd * sizeof(float)), *v = xmalloc((size_t)n * hd * sizeof(float));
                for (int t = 0; t < n; t++) {
                    fill_vector(k + (size_t)t * hd, hd, t);
                    fill_vector(v + (size_t)t * hd, hd, t + 3);
                }
                /* 1. pages: the CPU's kv_store, then the device's */
                uint8_t *cpu = calloc(bytes, 1), *gpu = calloc(bytes, 1);
                for (int t = 0; t < n; t++) {
                    uint8_t *page = cpu + (size_t)(t / tpp) * page_bytes;
                    int slot = t % tpp;
                    kv_store(page + L.k_codes, page + L.k_sz, p, p.kbits, slot, hd, k + (size_t)t * hd);
                    kv_store(page + L.v_codes, page + L.v_sz, p, p.vbits, slot, hd, v + (size_t)t * hd);
                }
                /* path 1, a decode step's write (one group), first: path 0's pages stay for
                 * the attention below */
                size_t diff = 0;
                if (groups == 1) {
                    if (gpu_test_store(p, hd, n, k, v, gpu, 1) != 0)
                        die("quant: gpu_test_store (decode path) refused k%dv%d", p.kbits, p.vbits);
                    for (size_t i = 0; i < bytes; i++) diff += cpu[i] != gpu[i];
                }
                if (gpu_test_store(p, hd, n, k, v, gpu, 0) != 0) die("quant: gpu_test_store refused k%dv%d", p.kbits, p.vbits);
                for (size_t i = 0; i < bytes; i++) diff += cpu[i] != gpu[i];
                /* 2. attention: dense double reference over the dequantized CPU pages */
                float *kd = xmalloc((size_t)n * hd * sizeof(float)), *vd = xmalloc((size_t)n * hd * sizeof(float));
                for (int t = 0; t < n; t++) {
                    uint8_t *page = cpu + (size_t)(t / tpp) * page_bytes;
                    kv_load(page + L.k_codes, page + L.k_sz, p, p.kbits, t % tpp, hd, kd + (size_t)t * hd);
                    kv_load(page + L.v_codes, page + L.v_sz, p, p.vbits, t % tpp, hd, vd + (size_t)t * hd);
                }
                double att_err = 0.0, pre_err = 0.0;
                int gqs[] = {1, 3, 4, 8};
                for (int gi = 0; gi < 4; gi++) {
                    int gq = gqs[gi];
                    float *q = xmalloc((size_t)gq * hd * sizeof(float));
                    float *o = xmalloc((size_t)n * gq * hd * sizeof(float));
                    double *ref = xmalloc((size_t)n * gq * hd * sizeof(double));
                    for (int i = 0; i < gq * hd; i++) q[i] = rng_uniform() * 3.0f;
                    /* row r: the dense attention of q over tokens 0 .. r */
                    for (int r = 0; r < n; r++) dense_attention(q, kd, vd, r + 1, gq, hd, ref + (size_t)r * gq * hd);
                    const double *last = ref + (size_t)(n - 1) * gq * hd;
                    for (int pps = 1; pps <= n_pages; pps += n_pages - 1) {   /* splits of 1 page, one split */
                        if (gpu_test_attention(p, hd, gq, n, gpu, q, pps, 0, o) != 0)
                            die("quant: gpu_test_attention refused k%dv%d gq %d", p.kbits, p.vbits, gq);
                        double e = max_rel_err(o, last, gq * hd);
                        if (!(e <= att_err)) att_err = e;
                        if (n_pages == 1) break;
                    }
                    /* the prompt kernel (code keys with one scale and zero, fp16), every
                     * position a row: each sees its own prefix */
                    if (gpu_test_attention(p, hd, gq, n, gpu, q, 1, n, o) == 0) {
                        prompt_cases++;
                        int shown = 0;
                        for (int r = 0; r < n; r++) {
                            double e = max_rel_err(o + (size_t)r * gq * hd, ref + (size_t)r * gq * hd, gq * hd);
                            if (!(e <= pre_err)) pre_err = e;
                            if (!(e <= 2e-3) && shown++ < 8) {   /* where it fails, and the
                                                                     decode kernel there */
                                float *od = xmalloc((size_t)gq * hd * sizeof(float));
                                double ed = gpu_test_attention(p, hd, gq, r + 1, gpu, q, 1, 0, od) == 0
                                                ? max_rel_err(od, ref + (size_t)r * gq * hd, gq * hd) : -1;
                                double rm = 0, om = 0, vm = 0;
                                for (int i = 0; i < gq * hd; i++) {
                                    rm = fmax(rm, fabs(ref[(size_t)r * gq * hd + i]));
                                    om = fmax(om, fabs(o[(size_t)r * gq * hd + i] - ref[(size_t)r * gq * hd + i]));
                                }
                                for (size_t i = 0; i < (size_t)(r + 1) * hd; i++) vm = fmax(vm, fabs(vd[i]));
                                printf("quant: prompt kernel d %d k%dv%d gq %d: row %d of %d rel err %.2e "
                                       "(decode kernel %.2e; max |ref| %.3e, |err| %.3e, max |v| %.3e)\n",
                                       hd, p.kbits, p.vbits, gq, r, n, e, ed, rm, om, vm);
                                free(od);
                            }
                        }
                    }
                    free(q); free(o); free(ref);
                }
                if (!(pre_err <= 2e-3) || !(att_err <= 2e-3))
                    printf("quant: d %d k%dv%d g%d: decode kernel %.2e, prompt kernel %.2e\n", hd,
                           p.kbits, p.vbits, groups, att_err, pre_err);
                if (!(pre_err <= att_err)) att_err = pre_err;
                int ok = diff == 0 && att_err <= 2e-3;
                if (!(att_err <= worst_att)) worst_att = att_err;
                cases++;
                failures += !ok;
                printf("quant: d %3d k%2dv%-2d g%d: page %4d B, %2d tokens/page, %d tokens: %zu of %zu "
                       "page bytes differ; attention rel err %.2e (prompt kernel %.2e) %s\n", hd,
                       p.kbits, p.vbits, groups, page_bytes, tpp, n, diff, bytes, att_err, pre_err,
                       ok ? "ok" : "FAIL");
                free(k); free(v); free(kd); free(vd); free(cpu); free(gpu);
            }
    printf("quant: %d cases, %d failed; worst attention rel err %.2e; the prompt kernel in %d "
           "(case, gq) pairs\n", cases, failures, worst_att, prompt_cases);
    printf("quant: %s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}

/* ----------------------------------------------------------------------------------------
 * attn: decode attention alone (gpu_bench_attention: one launch of attention_paged, plus the
 * split merge, over synthetic full pages), for each cache type at batch 64 and 8k context and
 * at batch 1 and 4k context, SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head
 * dim 64) and Llama-3-8B's (32, 8, 128). Bandwidth = K/V bytes read / time, against the
 * device-to-device copy bandwidth. */
static int gpu_mode_attn(const BenchOptions *o) {
    static const char *types[] = {"fp16", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2"};
    static const int shapes[][3] = {{9, 3, 64}, {32, 8, 128}};
    static const int loads[][2] = {{64, 8192}, {1, 4096}};
    char name[256];
    gpu_available(name, sizeof name);
    double copy = gpu_copy_bandwidth();
    printf("attn: %s, copy bandwidth %.0f GB/s, median of %d launches\n", name, copy, o->runs);
    printf("| heads (q/kv/dim) | batch | context | kv | ms | vs fp16 | GB/s | of copy |\n"
           "|---|---|---|---|---|---|---|---|\n");
    for (int si = 0; si < 2; si++)
        for (int li = 0; li < 2; li++) {
            double base = 0;
            for (int ti = 0; ti < 6; ti++) {
                LkvPrecision p = parse_kv(types[ti], 1, "attn");
                double bytes, ms = gpu_bench_attention(p, shapes[si][2], shapes[si][0],
                                                       shapes[si][1], loads[li][0], loads[li][1],
                                                       o->runs, &bytes);
                if (ms < 0) die("attn: %s not served", types[ti]);
                if (ti == 0) base = ms;
                double gbs = bytes / (ms * 1e-3) / 1e9;
                printf("| %d/%d/%d | %d | %d | %s | %.4f | %.2fx | %.0f | %.2f |\n", shapes[si][0],
                       shapes[si][1], shapes[si][2], loads[li][0], loads[li][1], types[ti], ms,
                       ms / base, gbs, gbs / copy);
            }
        }
    return 0;
}

/* ----------------------------------------------------------------------------------------
 * tiers: leankv's two-tier cache on the GPU against the CPU's, from the same inputs. The
 * cache-only test engine (gpu_build with no weights) and a CPU KVCache of the same pages are
 * fed the same q, k, v for every layer, row and step (no RoPE on either side), through the
 * same operations: several prompts (prefill scores, placement), decode steps (plan, take, the
 * four cases, attention over both tiers, decode scores), a release and a new admission in
 * the middle. Then, for every head: tier counts, page counts, the used page-table entries and
 * the bytes of every held token (codes, scales, zeros, positions) must be equal; scores and
 * attention outputs equal within a tolerance (they are sums of exponentials computed in a
 * different order). */

static void tiers_fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = rng_uniform() * scale;
}

/* the CPU twin of one prompt's pass through the cache-only engine: for each layer every row's
 * k, v into the cache, then every query head's attention_rows with prompt scores, as
 * forward_rows does; o (n_layers, n, QD) */
static void tiers_cpu_prefill(KVCache *kv, const Config *c, int seq, const float *qkv, int n,
                              float *o, float *att) {
    int hd = c->head_dim, QD = c->n_heads * hd, KVD = c->n_kv_heads * hd, ld = QD + 2 * KVD;
    int group = c->n_heads / c->n_kv_heads;
    for (int l = 0; l < c->n_layers; l++) {
        const float *in = qkv + (size_t)l * n * ld;
        for (int r = 0; r < n; r++)
            for (int h = 0; h < c->n_kv_heads; h++)
                kv_append(kv, kv_head(kv, seq, l, h), in + (size_t)r * ld + QD + h * hd,
                          in + (size_t)r * ld + QD + KVD + h * hd, r);
        float *q = xmalloc((size_t)n * QD * sizeof(float));
        for (int r = 0; r < n; r++) memcpy(q + (size_t)r * QD, in + (size_t)r * ld, QD * sizeof(float));
        for (int h = 0; h < c->n_heads; h++) {
            int hh = kv_head(kv, seq, l, h / group), n_tok = kv->n_tok[hh * LKV_MAX_TIERS];
            float *psc = kv->pscore + ((size_t)l * c->n_heads + h) * kv->ctx;
            for (int r = 0; r < n; r += ATT_LANES)
                attention_rows(kv, hh, n_tok - (n - 1 - r), n - r < ATT_LANES ? n - r : ATT_LANES,
                               q + (size_t)r * QD + h * hd, o + ((size_t)l * n + r) * QD + h * hd,
                               QD, att, psc, kv->policy[seq].first);
        }
        free(q);
    }
}

/* the CPU twin of a decode step of rows seqs[0..n): kv_write_token, attention_paged and
 * kv_score_decode per layer and KV head, as forward does (plans and pages: the caller) */
static void tiers_cpu_decode(KVCache *kv, const Config *c, const int *seqs, const int *pos,
                             const float *qkv, int n, float *o, float *att) {
    int hd = c->head_dim, QD = c->n_heads * hd, KVD = c->n_kv_heads * hd, ld = QD + 2 * KVD;
    int group = c->n_heads / c->n_kv_heads;
    for (int l = 0; l < c->n_layers; l++)
        for (int r = 0; r < n; r++) {
            const float *in = qkv + ((size_t)l * n + r) * ld;
            for (int h = 0; h < c->n_kv_heads; h++) {
                int hh = kv_head(kv, seqs[r], l, h), stride = pos[r] + 1;
                kv_write_token(kv, hh, in + QD + h * hd, in + QD + KVD + h * hd, pos[r]);
                attention_paged(kv, hh, group, in + h * group * hd, att, stride,
                                o + ((size_t)l * n + r) * QD + h * group * hd);
                kv_score_decode(kv, hh, att, group, stride);
            }
        }
}

static double tiers_max_err(const float *a, const float *b, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > worst) worst = d;
    }
    return worst;
}

/* every head of seq: counts, tables and held tokens of the GPU's cache against the CPU's;
 * returns the number of mismatches (printing the first few), *score_err the largest score
 * difference relative to max(1, |score|) */
static int tiers_compare(GpuEngine *g, KVCache *kv, const Config *c, int seq, const uint8_t *pool,
                         double *score_err) {
    int heads = c->n_layers * c->n_kv_heads, W = kv->table_width, bad = 0;
    int *counts = xmalloc((size_t)heads * 4 * sizeof(int)), *tabs = xmalloc((size_t)heads * W * sizeof(int));
    gpu_tier_counts(g, seq, counts);
    gpu_test_cache(g, seq, tabs, NULL);
    int d = kv->head_dim;
    for (int a = 0; a < heads; a++) {
        int hh = kv_head(kv, seq, a / c->n_kv_heads, a % c->n_kv_heads);
        int *nt = &kv->n_tok[hh * LKV_MAX_TIERS], *np = &kv->n_pg[hh * LKV_MAX_TIERS];
        if (counts[a * 4] != nt[0] || counts[a * 4 + 1] != nt[1] || counts[a * 4 + 2] != np[0] ||
            counts[a * 4 + 3] != np[1]) {
            if (bad++ < 5)
                printf("tiers: seq %d head %d: GPU tokens %d/%d pages %d/%d, CPU %d/%d, %d/%d\n", seq,
                       a, counts[a * 4], counts[a * 4 + 1], counts[a * 4 + 2], counts[a * 4 + 3],
                       nt[0], nt[1], np[0], np[1]);
            continue;
        }
        for (int t = 0; t < 2; t++)
            for (int k = 0; k < np[t]; k++) {
                int idx = t ? W - 1 - k : k;
                if (tabs[(size_t)a * W + idx] != kv->table[(size_t)hh * W + idx] && bad++ < 5)
                    printf("tiers: seq %d head %d: tier %d page %d is %d on the GPU, %d on the CPU\n",
                           seq, a, t, k, tabs[(size_t)a * W + idx], kv->table[(size_t)hh * W + idx]);
            }
        for (int t = 0; t < 2; t++) {
            const LkvPageLayout *L = &kv->layout[t];
            LkvPrecision p = kv->tier[t];
            int kc = lkv_code_bytes(d, p.kbits), ks = lkv_sz_bytes(p.groups, p.kbits);
            int vc = lkv_code_bytes(d, p.vbits), vs = lkv_sz_bytes(p.groups, p.vbits);
            for (int i = 0; i < nt[t]; i++) {
                int slot;
                const uint8_t *cp = kv_page(kv, hh, t, i, &slot);
                const uint8_t *gp = pool + (cp - kv->pool);   /* same page id on both sides */
                int same = !memcmp(cp + L->k_codes + slot * kc, gp + L->k_codes + slot * kc, kc) &&
                           !memcmp(cp + L->k_sz + slot * ks, gp + L->k_sz + slot * ks, ks) &&
                           !memcmp(cp + L->v_codes + slot * vc, gp + L->v_codes + slot * vc, vc) &&
                           !memcmp(cp + L->v_sz + slot * vs, gp + L->v_sz + slot * vs, vs) &&
                           !memcmp(cp + L->pos + slot * 4, gp + L->pos + slot * 4, 4);
                if (!same && bad++ < 5)
                    printf("tiers: seq %d head %d: tier %d token %d differs\n", seq, a, t, i);
                float sc = ((const float *)(cp + L->scores))[slot];
                float sg = ((const float *)(gp + L->scores))[slot];
                double e = fabs((double)sc - sg) / (fabs(sc) > 1 ? fabs(sc) : 1);
                if (e > *score_err) *score_err = e;
            }
        }
    }
    free(counts); free(tabs);
    return bad;
}

static int gpu_mode_tiers(const BenchOptions *o) {
    int failures = 0;
    /* leankv's default tiers at both head dims (one fused attention launch for both tiers),
     * another pair (fp16 high, k8v4 low: a launch per tier), and the default pair again in a
     * GPU engine built for 128 sequences, whose splits span the whole context: one block sees
     * all of a head's tokens and adds the scores itself */
    static const LkvPrecision pairs[4][2] = {{{8, 4, 1}, {4, 2, 1}}, {{8, 4, 1}, {4, 2, 1}},
                                             {{16, 16, 1}, {8, 4, 1}}, {{8, 4, 1}, {4, 2, 1}}};
    static const int dims[4] = {64, 128, 64, 64}, engine_slots[4] = {4, 4, 4, 128};
    for (int ci = 0; ci < 4; ci++) {
        int hd = dims[ci];
        Config c;
        memset(&c, 0, sizeof c);
        c.n_layers = 2; c.n_heads = 6; c.n_kv_heads = 2; c.head_dim = hd; c.dim = 6 * hd;
        c.hidden_dim = 64; c.vocab_size = 64; c.seq_len = 1024; c.rope_theta = 10000.0f;
        c.rope_style = LKV_ROPE_HALF; c.norm_eps = 1e-5f;
        int S = 4, ctx = 512, N = o->gen_len, QD = c.n_heads * hd, KVD = c.n_kv_heads * hd;
        int ld = QD + 2 * KVD, prompt[4] = {200, 131, 97, 256}, group = c.n_heads / c.n_kv_heads;
        LkvPrecision tiers[2] = {pairs[ci][0], pairs[ci][1]};
        LkvPolicy pol = {2.0f, 0.8f, 16, 0};   /* high alphas: every decode case happens */
        KVCache kv;
        build_kvcache_tiers(&kv, &c, S, ctx, 8, tiers, 2);
        kv.defaults = pol;
        char err[256];
        GpuEngine *g = gpu_build(&c, NULL, tiers, 2, pol, engine_slots[ci], 256, ctx, 8, err,
                                 sizeof err);
        if (!g) die("tiers: %s", err);
        GpuInfo gi;
        gpu_info(g, &gi);
        if (gi.n_pages != kv.n_pages || gi.table_width != kv.table_width)
            die("tiers: GPU pool %d pages, width %d; CPU %d, %d", gi.n_pages, gi.table_width,
                kv.n_pages, kv.table_width);
        float *qkv = xmalloc((size_t)c.n_layers * 256 * ld * sizeof(float));
        float *o_cpu = xmalloc((size_t)c.n_layers * 256 * QD * sizeof(float));
        float *o_gpu = xmalloc((size_t)c.n_layers * 256 * QD * sizeof(float));
        float *att = xmalloc((size_t)(ctx + 4) * ATT_LANES * group * sizeof(float) + (size_t)group * ctx * sizeof(float));
        int *len = xmalloc(S * sizeof(int)), cases[5] = {0}, toks[256] = {0}, nx[256];
        double o_err = 0, score_err = 0;
        /* a prompt into slot s, both sides; q scaled up so that attention is peaked enough for
         * every tier case to happen */
        for (int phase = 0; phase < 2; phase++) {
            for (int s = 0; s < S; s++) {
                if (phase == 1 && s != 1) continue;   /* phase 1: slot 1 again, after its release */
                int n = phase ? 180 : prompt[s];
                for (int l = 0; l < c.n_layers; l++)
                    for (int r = 0; r < n; r++) {
                        float *in = qkv + ((size_t)l * n + r) * ld;
                        tiers_fill(in, QD, 4.0f);
                        tiers_fill(in + QD, 2 * KVD, 1.0f);
                    }
                kv_begin(&kv, s, n, pol.alpha_high, pol.alpha_low);
                if (kv_reserve(&kv, s, n) != 0) die("tiers: CPU pool too small");
                tiers_cpu_prefill(&kv, &c, s, qkv, n, o_cpu, att);
                kv_place(&kv, s);
                gpu_begin(g, s, n, pol.alpha_high, pol.alpha_low);
                gpu_test_set_qkv(g, qkv, n);
                if (gpu_prefill(g, s, toks, n, nx, NULL) != 0) die("tiers: GPU prefill failed");
                gpu_test_get_o(g, o_gpu, n);
                double e = tiers_max_err(o_cpu, o_gpu, (size_t)c.n_layers * n * QD);
                if (e > o_err) o_err = e;
                gpu_place(g, s);
                len[s] = n;
            }
            /* decode steps for every slot at once */
            int slots[4] = {0, 1, 2, 3}, pos[4], need_c[4], need_g[4];
            for (int step = 0; step < N; step++) {
                for (int r = 0; r < S; r++) {
                    pos[r] = len[r];
                    need_c[r] = kv_plan_step(&kv, r, pos[r]);
                    for (int a = 0; a < c.n_layers * c.n_kv_heads; a++)
                        cases[kv.plan[kv_head(&kv, r, a / c.n_kv_heads, a % c.n_kv_heads) * 3]]++;
                }
                gpu_plan(g, S, slots, need_g);
                for (int r = 0; r < S; r++)
                    if (need_c[r] != need_g[r] && failures++ < 5)
                        printf("tiers: step %d slot %d: GPU plans %d pages, CPU %d\n", step, r,
                               need_g[r], need_c[r]);
                if (kv_take_planned(&kv) != 0) die("tiers: CPU pool too small");
                for (int l = 0; l < c.n_layers; l++)
                    for (int r = 0; r < S; r++) {
                        float *in = qkv + ((size_t)l * S + r) * ld;
                        tiers_fill(in, QD, 4.0f);
                        tiers_fill(in + QD, 2 * KVD, 1.0f);
                    }
                tiers_cpu_decode(&kv, &c, slots, pos, qkv, S, o_cpu, att);
                gpu_test_set_qkv(g, qkv, S);
                if (gpu_decode(g, S, slots, toks, nx, NULL) != 0) die("tiers: GPU decode failed");
                gpu_test_get_o(g, o_gpu, S);
                double e = tiers_max_err(o_cpu, o_gpu, (size_t)c.n_layers * S * QD);
                if (e > o_err) o_err = e;
                for (int r = 0; r < S; r++) len[r]++;
            }
            if (phase == 0) {   /* slot 1 leaves, its pages go back on both sides */
                kv_release(&kv, 1);
                gpu_release(g, 1);
                len[1] = 0;
            }
        }
        gpu_info(g, &gi);
        uint8_t *pool = xmalloc((size_t)kv.n_pages * kv.page_bytes);
        int tabs_dummy_bad = 0;
        {
            int *tabs = xmalloc((size_t)c.n_layers * c.n_kv_heads * kv.table_width * sizeof(int));
            gpu_test_cache(g, 0, tabs, pool);
            free(tabs);
        }
        for (int s = 0; s < S; s++) tabs_dummy_bad += tiers_compare(g, &kv, &c, s, pool, &score_err);
        int free_ok = gi.free_pages == kv.free_count;
        KVTotals tot;
        for (int s = 0; s < S; s++) kv_account(&kv, s);
        tot = kv_totals(&kv);
        int ok = !tabs_dummy_bad && free_ok && score_err <= 1e-3 && o_err <= 2e-2;
        printf("tiers: k%dv%d / k%dv%d, head dim %d, %d slots (engine of %d), %d decode steps x 2 phases: cases prune %d swap %d "
               "demote %d append %d (all heads); held high %.0f%% low %.0f%% pruned %.0f%%; "
               "free pages GPU %d CPU %d; %d mismatches; score err %.2e (<= 1e-3); attention "
               "max abs err %.2e (<= 2e-2) %s\n", tiers[0].kbits, tiers[0].vbits, tiers[1].kbits,
               tiers[1].vbits, hd, S, engine_slots[ci], N, cases[1], cases[2], cases[3], cases[4],
               100 * tot.high / tot.seen, 100 * tot.low / tot.seen,
               100 * (tot.seen - tot.high - tot.low) / tot.seen, gi.free_pages, kv.free_count,
               tabs_dummy_bad, score_err, o_err, ok ? "ok" : "FAIL");
        failures += !ok;
        free(pool); free(qkv); free(o_cpu); free(o_gpu); free(att); free(len);
        gpu_free(g);
        free_kvcache(&kv);
    }
    printf("tiers: %s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    BenchOptions o = {0};
    o.prompt_len = 64; o.gen_len = 64; o.batch = 1; o.requests = 0; o.chunk = 512; o.runs = 3;
    if (argc < 3) die("usage: leankv-gpu-bench check|batch|bench|quant|attn|tiers MODEL.bin|random|none [options]");
    o.mode = argv[1];
    o.model = argv[2];
    const char *kv_name = "fp16";
    int groups = 1;
    o.tol = 1e-2;
    o.match = 33;
    for (int i = 3; i < argc; i++) {
        if (i + 1 >= argc) die("%s needs a value", argv[i]);
        if (!strcmp(argv[i], "--kv")) { kv_name = argv[++i]; continue; }
        if (!strcmp(argv[i], "--tol")) { o.tol = parse_float(argv[++i], "--tol"); continue; }
        if (!strcmp(argv[i], "--tol-quant")) { o.tol_quant = parse_float(argv[++i], "--tol-quant"); continue; }
        long v = parse_long(argv[i + 1], argv[i], 0, 1L << 30);
        if (!strcmp(argv[i], "--kv-groups")) { groups = (int)v; i++; continue; }
        if (!strcmp(argv[i], "--match")) { o.match = (int)v; i++; continue; }
        if (!strcmp(argv[i], "--prompt-len")) o.prompt_len = (int)v;
        else if (!strcmp(argv[i], "--gen-len")) o.gen_len = (int)v;
        else if (!strcmp(argv[i], "--batch")) o.batch = (int)v;
        else if (!strcmp(argv[i], "--requests")) o.requests = (int)v;
        else if (!strcmp(argv[i], "--chunk")) o.chunk = (int)v;
        else if (!strcmp(argv[i], "--kv-mem")) o.kv_mem_mib = (size_t)v;
        else if (!strcmp(argv[i], "--ctx")) o.ctx = (int)v;
        else if (!strcmp(argv[i], "--runs")) o.runs = (int)v;
        else if (!strcmp(argv[i], "--seed")) rng_state = (uint64_t)v * 2654435761u + 1;
        else die("unknown option %s", argv[i]);
        i++;
    }
    if (o.prompt_len < 8 || o.gen_len < 1 || o.batch < 1 || o.chunk < 1 || o.runs < 1)
        die("--prompt-len >= 8, --gen-len, --batch, --chunk, --runs >= 1");
    o.kv = parse_kv(kv_name, groups, "--kv");
    char name[256];
    if (!gpu_available(name, sizeof name)) die("no usable CUDA device: %s", name);
    build_h2f_table();
    if (!strcmp(o.mode, "quant")) return gpu_mode_quant();
    if (!strcmp(o.mode, "attn")) return gpu_mode_attn(&o);
    if (!strcmp(o.mode, "tiers")) return gpu_mode_tiers(&o);
    Model m;
    load_model(&m, o.model);
    if (!strcmp(o.mode, "check")) return gpu_mode_check(&m, &o);
    if (!strcmp(o.mode, "batch")) { if (!o.requests) o.requests = 64; return gpu_mode_batch(&m, &o); }
    if (!strcmp(o.mode, "bench")) return gpu_mode_bench(&m, &o);
    die("unknown mode '%s' (check, batch, bench, quant, attn, tiers)", o.mode);
}
