/* leankv.cu: the GPU twin of leankv.c. Same model, same page layout, same function names.
 *
 * leankv.c runs one token at a time on the CPU. Here a forward pass takes a batch of "rows",
 * each row one token of one sequence at that sequence's next position, so the same code serves
 * a chunk of a prompt (many rows of one sequence) and a decode step (one row of each of many
 * sequences). The KV cache is the CPU's: pages of one (sequence, layer, KV head) at one
 * precision (fp16 or kXvY codes; with --kv leankv, a high and a low tier), a page table per
 * such head, a circular array of free page ids -- only it lives in GPU memory and is managed by
 * kernels (../shared/LEANKV.md sections 3 to 6).
 *
 * Sections, in the order data flows (the same as leankv.c):
 *   errors | model (weights upload, activations) | KV cache | forward | argmax | engine API
 *
 * Precision: weights and matrix inputs fp16, every accumulation fp32 (cuBLAS with fp32
 * compute, or matvec for an engine of one or two sequences), the residual stream fp32, logits
 * fp32.
 *
 * Launches: a decode step is a CUDA graph; its own kernels go out through launch_pdl, so that
 * each may start while the one before finishes (programmatic dependent launch). */

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef LKV_CUDA
#define LKV_CUDA   /* this file is the GPU side: declare the engine API, not the stubs */
#endif
#include "leankv.h"

/* ----------------------------------------------------------------------------------------
 * Errors: a failed CUDA or cuBLAS call is a bug or a broken device; say where and stop. */

static void cuda_check(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "leankv: error: CUDA %s at %s:%d: %s\n", what, file, line,
            cudaGetErrorString(e));
    exit(1);
}
#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
/* after every kernel launch: catches a bad launch configuration at once */
#define LAUNCH_CHECK() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

static void cublas_check(cublasStatus_t s, const char *what, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "leankv: error: cuBLAS %s at %s:%d: status %d\n", what, file, line, (int)s);
    exit(1);
}
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)

/* Programmatic dependent launch (sm_90): a kernel launched by launch_pdl may start while the
 * kernel before it is finishing, to run what does not depend on it (matvec fetches its weights).
 * grid_wait() blocks until the kernel before has completed and its writes are visible; every
 * kernel launched this way calls it before it reads what earlier kernels wrote, or writes what
 * they read. grid_release(), called after grid_wait(), lets the next kernel start early: only
 * two kernels overlap at a time. Both are no-ops in a kernel launched the plain way. */
__device__ __forceinline__ void grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* kernel<<<grid, block, smem, st>>>(args), marked as allowed to overlap the kernel before it
 * when pdl is set (LEANKV_PDL=0 turns it off, to measure what it buys) */
template <typename... Params, typename... Args>
static void launch_pdl(int pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t st, Args... args) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid; cfg.blockDim = block; cfg.dynamicSmemBytes = smem; cfg.stream = st;
    cfg.attrs = &attr; cfg.numAttrs = pdl ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, ((Params)args)...));
}

static void *dmalloc(size_t bytes) {   /* device memory; only ever called from gpu_build */
    void *p = NULL;
    CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}

/* ----------------------------------------------------------------------------------------
 * Model on the GPU: fp16 matrices, fp32 norms and biases, and the activations of one step.
 *
 * Projections that read the same input are stacked into one matrix so that one GEMM does
 * them: wq, wk, wv -> wqkv and w1, w3 -> w13. */

typedef struct {
    __half *wqkv;      /* (QD + 2*KVD, dim) rows of wq, then wk, then wv */
    float *bqkv;       /* (QD + 2*KVD) the biases, or NULL */
    __half *wo;        /* (dim, QD) */
    __half *w13;       /* (2*hidden_dim, dim) rows of w1 (gate), then w3 (up) */
    __half *w2;        /* (dim, hidden_dim) */
    float *attn_norm;  /* (dim) */
    float *ffn_norm;   /* (dim) */
} DeviceLayer;

typedef struct {
    __half *tok_embeddings; /* (vocab, dim) */
    DeviceLayer *layers;    /* (n_layers) host array of device pointers */
    float *norm;            /* (dim) */
    __half *output;         /* (vocab, dim), = tok_embeddings when tied */
} DeviceWeights;

/* Every buffer holds max_rows rows; a step uses the first n_rows. */
typedef struct {
    int *rows;         /* (4, max_rows) device: slot, token, pos, out_row of each row */
    int *row_slot;     /* = rows + 0*max_rows: the sequence's slot */
    int *row_token;    /* = rows + 1*max_rows: the token id */
    int *row_pos;      /* = rows + 2*max_rows: its position; -1 marks a padding row */
    int *out_rows;     /* = rows + 3*max_rows: rows whose logits are wanted, compacted */
    float *x;          /* (max_rows, dim) residual stream */
    float *y;          /* (max_rows, dim) output of the last block, not yet added to x */
    __half *xb;        /* (max_rows, dim) rmsnorm(x), the input of a projection */
    float *qkv;        /* (max_rows, QD + 2*KVD) Wqkv xb */
    float *q;          /* (max_rows, QD) queries after RoPE */
    __half *o;         /* (max_rows, QD) attention output */
    float *att_part;   /* (max_rows, n_heads, max_splits, head_dim + 2) split partials */
    float *gu;         /* (max_rows, 2*hidden_dim) W13 xb: gate, then up */
    __half *hb;        /* (max_rows, hidden_dim) silu(gate) * up */
    __half *xo;        /* (max_rows, dim) final rmsnorm of the rows in out_rows */
    float *logits;     /* (max_rows, vocab) */
    int *next;         /* (max_rows) argmax of each logits row */
    int *h_rows;       /* (4, max_rows) pinned host staging for rows */
    int *h_next;       /* (max_rows) pinned host copy of next */
    int *arrive;       /* (max_rows, n_kv_heads) attention_finish's counters, 0 between launches */
} RunState;

/* fp32 host values -> fp16 device buffer at dst, through the shared lkv_f2h */
static void upload_f16(__half *dst, const float *src, size_t n, uint16_t *stage) {
    for (size_t i = 0; i < n; i++) stage[i] = lkv_f2h(src[i]);
    CUDA_CHECK(cudaMemcpy(dst, stage, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
}

static float *upload_f32(const float *src, size_t n) {
    float *d = (float *)dmalloc(n * sizeof(float));
    CUDA_CHECK(cudaMemcpy(d, src, n * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}

static void build_weights(DeviceWeights *dw, const Config *c, const Weights *w) {
    size_t D = c->dim, H = c->hidden_dim, V = c->vocab_size;
    size_t QD = (size_t)c->n_heads * c->head_dim, KVD = (size_t)c->n_kv_heads * c->head_dim;
    size_t biggest = V * D > 2 * H * D ? V * D : 2 * H * D;
    if ((QD + 2 * KVD) * D > biggest) biggest = (QD + 2 * KVD) * D;
    uint16_t *stage = (uint16_t *)malloc(biggest * sizeof(uint16_t));
    if (!stage) { fprintf(stderr, "leankv: error: out of host memory\n"); exit(1); }

    dw->tok_embeddings = (__half *)dmalloc(V * D * sizeof(__half));
    upload_f16(dw->tok_embeddings, w->tok_embeddings, V * D, stage);
    dw->layers = (DeviceLayer *)calloc(c->n_layers, sizeof(DeviceLayer));
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *L = &w->layers[l];
        DeviceLayer *dl = &dw->layers[l];
        dl->wqkv = (__half *)dmalloc((QD + 2 * KVD) * D * sizeof(__half));
        upload_f16(dl->wqkv, L->wq, QD * D, stage);
        upload_f16(dl->wqkv + QD * D, L->wk, KVD * D, stage);
        upload_f16(dl->wqkv + (QD + KVD) * D, L->wv, KVD * D, stage);
        dl->bqkv = NULL;
        if (c->qkv_bias) {
            dl->bqkv = (float *)dmalloc((QD + 2 * KVD) * sizeof(float));
            CUDA_CHECK(cudaMemcpy(dl->bqkv, L->bq, QD * 4, cudaMemcpyHostToDevice));
            CUDA_CHECK(cudaMemcpy(dl->bqkv + QD, L->bk, KVD * 4, cudaMemcpyHostToDevice));
            CUDA_CHECK(cudaMemcpy(dl->bqkv + QD + KVD, L->bv, KVD * 4, cudaMemcpyHostToDevice));
        }
        dl->wo = (__half *)dmalloc(D * QD * sizeof(__half));
        upload_f16(dl->wo, L->wo, D * QD, stage);
        dl->w13 = (__half *)dmalloc(2 * H * D * sizeof(__half));
        upload_f16(dl->w13, L->w1, H * D, stage);
        upload_f16(dl->w13 + H * D, L->w3, H * D, stage);
        dl->w2 = (__half *)dmalloc(D * H * sizeof(__half));
        upload_f16(dl->w2, L->w2, D * H, stage);
        dl->attn_norm = upload_f32(L->attn_norm, D);
        dl->ffn_norm = upload_f32(L->ffn_norm, D);
    }
    dw->norm = upload_f32(w->norm, D);
    if (c->tied) dw->output = dw->tok_embeddings;
    else {
        dw->output = (__half *)dmalloc(V * D * sizeof(__half));
        upload_f16(dw->output, w->output, V * D, stage);
    }
    free(stage);
}

static void free_weights(DeviceWeights *dw, const Config *c) {
    for (int l = 0; l < c->n_layers; l++) {
        DeviceLayer *dl = &dw->layers[l];
        cudaFree(dl->wqkv); cudaFree(dl->bqkv); cudaFree(dl->wo); cudaFree(dl->w13);
        cudaFree(dl->w2); cudaFree(dl->attn_norm); cudaFree(dl->ffn_norm);
    }
    if (dw->output != dw->tok_embeddings) cudaFree(dw->output);
    cudaFree(dw->tok_embeddings); cudaFree(dw->norm);
    free(dw->layers);
}

static void build_runstate(RunState *s, const Config *c, int max_rows, int max_splits) {
    size_t R = max_rows, D = c->dim, H = c->hidden_dim, V = c->vocab_size;
    size_t QD = (size_t)c->n_heads * c->head_dim, KVD = (size_t)c->n_kv_heads * c->head_dim;
    s->rows = (int *)dmalloc(4 * R * sizeof(int));
    s->row_slot = s->rows; s->row_token = s->rows + R; s->row_pos = s->rows + 2 * R;
    s->out_rows = s->rows + 3 * R;
    s->x = (float *)dmalloc(R * D * sizeof(float));
    s->y = (float *)dmalloc(R * D * sizeof(float));
    s->xb = (__half *)dmalloc(R * D * sizeof(__half));
    s->qkv = (float *)dmalloc(R * (QD + 2 * KVD) * sizeof(float));
    s->q = (float *)dmalloc(R * QD * sizeof(float));
    s->o = (__half *)dmalloc(R * QD * sizeof(__half));
    s->att_part = (float *)dmalloc(R * max_splits * c->n_heads * (c->head_dim + 2) * sizeof(float));
    s->gu = (float *)dmalloc(R * 2 * H * sizeof(float));
    s->hb = (__half *)dmalloc(R * H * sizeof(__half));
    s->xo = (__half *)dmalloc(R * D * sizeof(__half));
    s->logits = (float *)dmalloc(R * V * sizeof(float));
    s->next = (int *)dmalloc(R * sizeof(int));
    s->arrive = (int *)dmalloc(R * c->n_kv_heads * sizeof(int));
    CUDA_CHECK(cudaMemset(s->arrive, 0, R * c->n_kv_heads * sizeof(int)));
    CUDA_CHECK(cudaMallocHost(&s->h_rows, 4 * R * sizeof(int)));
    CUDA_CHECK(cudaMallocHost(&s->h_next, R * sizeof(int)));
}

static void free_runstate(RunState *s) {
    cudaFree(s->rows); cudaFree(s->x); cudaFree(s->y); cudaFree(s->xb); cudaFree(s->qkv);
    cudaFree(s->q); cudaFree(s->o); cudaFree(s->att_part); cudaFree(s->gu); cudaFree(s->hb);
    cudaFree(s->xo); cudaFree(s->logits); cudaFree(s->next); cudaFree(s->arrive);
    cudaFreeHost(s->h_rows); cudaFreeHost(s->h_next);
}

/* ----------------------------------------------------------------------------------------
 * KV cache on the GPU: the same pages, page tables and free ring as leankv.c's KVCache.
 *
 * Pages are taken and given back by kernels, in the three parallel steps of LEANKV.md
 * section 6: each row (or head) says how many pages it takes, a prefix sum turns the counts
 * into disjoint ranges of the free ring, and each one moves its own range. The host never
 * touches a page id; it keeps only the counts it needs to decide what fits (free_count and
 * each slot's length). With one precision they are exact by arithmetic: every page a slot
 * holds is a full or the last partial page of its tokens, ceil(len / tpp) pages per head.
 * With leankv's two tiers each head's counts live on the GPU (n_tok, n_pg), the policy kernel
 * tells the host each step's pages, and a give reads back the free count. */

typedef struct {
    int n_layers;
    int n_kv_heads;
    int width;          /* page-table entries per head */
    int tpp;            /* tokens per page */
    int page_bytes;
    int k_codes, k_sz;  /* segment offsets inside a page (lkv_layout) */
    int v_codes, v_sz;
    int scores, pos;
    int kbits, vbits;   /* 16 (fp16), 8, 4 or 2 */
    int groups;         /* scale/zero groups per head vector */
    int n_pages;        /* pages in the pool */
    int tmul;           /* t / tpp = (t * tmul) >> 20 for every token index of a head, when tpp
                           is not a power of two (a low tier's 28); 0: divide */
} KvGeom;

/* t / tpp without a division per token: pages of a power of two tokens shift, others multiply
 * by a reciprocal that the host has checked exact for every index a head can reach */
__device__ __forceinline__ int kv_page_index(const KvGeom &g, int t) {
    if ((g.tpp & (g.tpp - 1)) == 0) return t >> (__ffs(g.tpp) - 1);
    return g.tmul ? (int)(((unsigned)t * (unsigned)g.tmul) >> 20) : t / g.tpp;
}               /* what a kernel needs to find token i of a head: passed by value */

typedef struct {
    KvGeom tg[LKV_MAX_TIERS]; /* [n_tiers] each tier's geometry: same pages, own layout (tg[0]:
                             the only tier of a one-precision cache) */
    int n_tiers;          /* 1: one precision; 2: leankv's high and low tiers */
    LkvPrecision tier[LKV_MAX_TIERS]; /* [n_tiers] precision of each tier (--kv / --kv-high, --kv-low) */
    LkvPageLayout layouts[LKV_MAX_TIERS]; /* [n_tiers] each tier's page layout, from leankv.h */
    uint8_t *pool;        /* (n_pages, page_bytes) device */
    int *free_ids;        /* (n_pages) device, circular array of free page ids */
    int *ring;            /* (3) device: free_start, free_count, total of the last scan */
    int *table;           /* (max_slots, n_layers, n_kv_heads, width) device page ids; two
                             tiers: high pages from the left, low from the right */
    int free_count;       /* host copy of ring[1], kept exact without reading it back */
    int *slot_len;        /* (max_slots) host: tokens each slot has processed */
    int max_slots;
    /* two tiers only (NULL otherwise): the per-head counts and the manager's arrays */
    int n_heads_total;    /* max_slots * n_layers * n_kv_heads */
    int *n_tok;           /* (n_heads_total, 2) device: tokens held in each tier */
    int *n_pg;            /* (n_heads_total, 2) device: pages held by each tier */
    int *want;            /* (n_heads_total, 2) device: pages a head takes or gives (section 6) */
    int *offset;          /* (n_heads_total, 2) device: exclusive prefix sum of want */
    void *scan_tmp;       /* cub's scratch for that prefix sum */
    size_t scan_tmp_bytes;
    int *plan;            /* (n_heads_total, 3) device: next token's decode case, L and R */
    LkvPolicy *policy;    /* (max_slots) device: each slot's alphas, window, first counted row */
    LkvPolicy *h_policy;  /* (max_slots) pinned host copy */
    LkvPolicy defaults;   /* alphas and window of a request that names none */
    int *placed;          /* (max_slots) host: 1 once the slot's prompt is placed */
    float *pscore;        /* (n_layers, n_heads, ctx) device: prompt score sums per query head
                             of the one slot in prefill */
    float *stage;         /* (n_layers, n_kv_heads, ctx, 2 * head_dim + 2) device: placement's
                             low tokens (k, v, score, position) */
    float *raw;           /* (max_rows, n_heads, ctx) device: a decode step's q.k/sqrt(d) */
    float *ml;            /* (max_rows, n_heads, 2) device: its softmax max and sum */
    int *row_need;        /* (max_rows) device: pages each row's planned step takes */
    int *h_need;          /* (max_rows) pinned host copy */
    int *h_free;          /* (1) pinned: the free count a give reads back */
    int *slot_need;       /* (max_slots) host: pages each slot's planned step takes */
    /* the swap space (leankv.h 4d; gpu_build_swap), empty unless --swap-mem */
    LkvSwapSpace swap;    /* its pages: pinned host memory, mapped into the device's space */
    uint8_t *swap_dev;    /* the device's address of swap.pages */
    int *swap_list;       /* (2, n_layers * n_kv_heads * width) device: a swap's table entries,
                             then its swap pages (a slot holds at most a table of pages) */
    int *h_swap_list;     /* the same, pinned host copy */
} KVCache;

/* index of the page table of (slot, layer, KV head) */
__device__ __forceinline__ size_t kv_head(const KvGeom &g, int slot, int layer, int h) {
    return ((size_t)slot * g.n_layers + layer) * g.n_kv_heads + h;
}

__global__ void init_free_ring(int *free_ids, int *ring, int n_pages) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_pages) free_ids[i] = i;
    if (i == 0) { ring[0] = 0; ring[1] = n_pages; ring[2] = 0; }
}

static KvGeom tier_geom(const Config *c, LkvPrecision p, const LkvPageLayout *L, int page_bytes,
                        int width) {
    KvGeom g;
    memset(&g, 0, sizeof g);
    g.n_layers = c->n_layers; g.n_kv_heads = c->n_kv_heads;
    g.tpp = L->tokens; g.page_bytes = page_bytes; g.width = width;
    g.k_codes = L->k_codes; g.k_sz = L->k_sz; g.v_codes = L->v_codes; g.v_sz = L->v_sz;
    g.scores = L->scores; g.pos = L->pos;
    g.kbits = p.kbits; g.vbits = p.vbits; g.groups = p.groups;
    int ctx = (width - 2) * g.tpp;   /* tokens a head can hold, at most */
    if ((g.tpp & (g.tpp - 1)) && ctx <= 16384) {
        g.tmul = ((1 << 20) + g.tpp - 1) / g.tpp;
        for (int t = 0; t < ctx + 2 * g.tpp; t++)
            if ((int)(((unsigned)t * (unsigned)g.tmul) >> 20) != t / g.tpp) { g.tmul = 0; break; }
    }
    return g;
}

/* The cache: one precision, or leankv's two tiers (tiers[0] high, tiers[1] low), the page
 * size chosen for all tiers at once (leankv.h section 4). max_rows sizes the per-row scratch
 * of two-tier decode steps. */
static void build_kvcache(KVCache *kv, const Config *c, const LkvPrecision *tiers, int n_tiers,
                          int max_slots, int max_rows, int ctx, size_t kv_mem_mib,
                          cudaStream_t st) {
    memset(kv, 0, sizeof *kv);
    kv->n_tiers = n_tiers;
    for (int t = 0; t < n_tiers; t++) kv->tier[t] = tiers[t];
    int page_bytes = lkv_page_bytes(tiers, n_tiers, c->head_dim, NULL);
    for (int t = 0; t < n_tiers; t++)
        lkv_layout_fit(&kv->layouts[t], tiers[t], c->head_dim, page_bytes, n_tiers > 1);
    int tpp = kv->layouts[0].tokens, width = lkv_pages_for(ctx, tpp) + 2;
    for (int t = 0; t < n_tiers; t++)
        kv->tg[t] = tier_geom(c, tiers[t], &kv->layouts[t], page_bytes, width);
    KvGeom *g = &kv->tg[0];
    kv->max_slots = max_slots;
    size_t bytes;
    if (kv_mem_mib) bytes = kv_mem_mib << 20;
    else {  /* default: 90% of what is free now, less 512 MiB for cuBLAS and graphs */
        size_t free_b, total_b;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        bytes = free_b > (1024u << 20) ? (size_t)(free_b * 0.9) - (512u << 20) : free_b / 2;
    }
    size_t n_pages = bytes / page_bytes;
    if (n_pages > (1u << 30)) n_pages = 1u << 30;
    for (int t = 0; t < n_tiers; t++) kv->tg[t].n_pages = (int)n_pages;
    kv->pool = (uint8_t *)dmalloc(n_pages * page_bytes);
    kv->free_ids = (int *)dmalloc(n_pages * sizeof(int));
    kv->ring = (int *)dmalloc(3 * sizeof(int));
    kv->table = (int *)dmalloc((size_t)max_slots * c->n_layers * c->n_kv_heads * g->width * 4);
    init_free_ring<<<(g->n_pages + 255) / 256, 256, 0, st>>>(kv->free_ids, kv->ring, g->n_pages);
    LAUNCH_CHECK();
    kv->free_count = g->n_pages;
    kv->slot_len = (int *)calloc(max_slots, sizeof(int));
    if (n_tiers < 2) return;
    size_t H = (size_t)max_slots * c->n_layers * c->n_kv_heads;
    kv->n_heads_total = (int)H;
    kv->n_tok = (int *)dmalloc(H * 2 * sizeof(int));
    kv->n_pg = (int *)dmalloc(H * 2 * sizeof(int));
    kv->want = (int *)dmalloc(H * 2 * sizeof(int));
    kv->offset = (int *)dmalloc(H * 2 * sizeof(int));
    kv->plan = (int *)dmalloc(H * 3 * sizeof(int));
    CUDA_CHECK(cudaMemsetAsync(kv->n_tok, 0, H * 2 * sizeof(int), st));
    CUDA_CHECK(cudaMemsetAsync(kv->n_pg, 0, H * 2 * sizeof(int), st));
    CUDA_CHECK(cudaMemsetAsync(kv->want, 0, H * 2 * sizeof(int), st));
    CUDA_CHECK(cudaMemsetAsync(kv->plan, 0, H * 3 * sizeof(int), st));
    CUDA_CHECK(cub::DeviceScan::ExclusiveSum(NULL, kv->scan_tmp_bytes, kv->want, kv->offset,
                                             (int)(H * 2), st));
    kv->scan_tmp = dmalloc(kv->scan_tmp_bytes);
    kv->policy = (LkvPolicy *)dmalloc(max_slots * sizeof(LkvPolicy));
    CUDA_CHECK(cudaMallocHost(&kv->h_policy, max_slots * sizeof(LkvPolicy)));
    kv->placed = (int *)calloc(max_slots, sizeof(int));
    kv->pscore = (float *)dmalloc((size_t)c->n_layers * c->n_heads * ctx * sizeof(float));
    kv->stage = (float *)dmalloc((size_t)c->n_layers * c->n_kv_heads * ctx * (2 * c->head_dim + 2) *
                                 sizeof(float));
    kv->raw = (float *)dmalloc((size_t)max_rows * c->n_heads * ctx * sizeof(float));
    kv->ml = (float *)dmalloc((size_t)max_rows * c->n_heads * 2 * sizeof(float));
    kv->row_need = (int *)dmalloc(max_rows * sizeof(int));
    CUDA_CHECK(cudaMallocHost(&kv->h_need, max_rows * sizeof(int)));
    CUDA_CHECK(cudaMallocHost(&kv->h_free, sizeof(int)));
    kv->slot_need = (int *)malloc(max_slots * sizeof(int));
    for (int i = 0; i < max_slots; i++) kv->slot_need[i] = -1;   /* -1: not planned */
}

static void free_kvcache(KVCache *kv) {
    cudaFree(kv->pool); cudaFree(kv->free_ids); cudaFree(kv->ring); cudaFree(kv->table);
    free(kv->slot_len);
    cudaFreeHost(kv->swap.pages); free(kv->swap.free_ids);
    cudaFree(kv->swap_list); cudaFreeHost(kv->h_swap_list);
    if (kv->n_tiers < 2) return;
    cudaFree(kv->n_tok); cudaFree(kv->n_pg); cudaFree(kv->want); cudaFree(kv->offset);
    cudaFree(kv->scan_tmp); cudaFree(kv->plan); cudaFree(kv->policy); cudaFreeHost(kv->h_policy);
    free(kv->placed); cudaFree(kv->pscore); cudaFree(kv->stage); cudaFree(kv->raw);
    cudaFree(kv->ml); cudaFree(kv->row_need); cudaFreeHost(kv->h_need); cudaFreeHost(kv->h_free);
    free(kv->slot_need);
}

/* Before a step: a row whose position is the first slot of a page opens a new page in every
 * (layer, KV head) of its sequence. One block: (1) each row's count is 1 or 0, (2) a block-wide
 * prefix sum gives each row its offset in the free ring, (3) each (row, head) takes its page.
 * The host has checked that the ring holds enough. */
#define RESERVE_THREADS 1024
__global__ void __launch_bounds__(RESERVE_THREADS)
kv_reserve(int *table, int *free_ids, int *ring, const int *row_slot, const int *row_pos,
           int n_rows, KvGeom g) {
    typedef cub::BlockScan<int, RESERVE_THREADS> Scan;
    __shared__ typename Scan::TempStorage tmp;
    __shared__ int offset[RESERVE_THREADS];
    int heads = g.n_layers * g.n_kv_heads;   /* pages a new row takes */
    int start = ring[0], taken = 0;          /* rows that took pages in earlier tiles */
    for (int base = 0; base < n_rows; base += RESERVE_THREADS) {
        int r = base + threadIdx.x;
        int pos = r < n_rows ? row_pos[r] : -1;
        int opens = pos >= 0 && pos % g.tpp == 0;
        int off, total;
        Scan(tmp).ExclusiveSum(opens, off, total);
        offset[threadIdx.x] = opens ? taken + off : -1;
        __syncthreads();
        int tile = min(RESERVE_THREADS, n_rows - base);
        for (int i = threadIdx.x; i < tile * heads; i += RESERVE_THREADS) {
            int rr = i / heads, hh = i % heads;   /* hh = layer * n_kv_heads + kv head */
            if (offset[rr] < 0) continue;
            int page = free_ids[(start + (size_t)offset[rr] * heads + hh) % g.n_pages];
            int p = row_pos[base + rr];
            size_t head = (size_t)row_slot[base + rr] * heads + hh;
            table[head * g.width + p / g.tpp] = page;
        }
        taken += total;
        __syncthreads();
    }
    __syncthreads();   /* every thread has read ring[0] before thread 0 moves it */
    if (threadIdx.x == 0) {
        ring[0] = (int)((start + (size_t)taken * heads) % g.n_pages);
        ring[1] -= taken * heads;
    }
}

/* Gives back the n_pg pages of every head of slot: they land as one contiguous run at the
 * end of the free ring (the "parallel compaction"); no token data moves. */
__global__ void kv_release(int *free_ids, int *ring, const int *table, int slot, int n_pg,
                           KvGeom g) {
    int heads = g.n_layers * g.n_kv_heads, total = heads * n_pg;
    int end = ring[0] + ring[1];
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        int hh = i / n_pg, p = i % n_pg;
        free_ids[((size_t)end + i) % g.n_pages] = table[((size_t)slot * heads + hh) * g.width + p];
    }
    __syncthreads();   /* every thread read ring before thread 0 moves it */
    if (threadIdx.x == 0) ring[1] += total;
}

/* Takes n_pg pages for every head of slot from the front of the free ring, as one run: the
 * twin of kv_release, for a one-tier slot coming back from the swap space */
__global__ void kv_take_run(int *table, const int *free_ids, int *ring, int slot, int n_pg,
                            KvGeom g) {
    int heads = g.n_layers * g.n_kv_heads, total = heads * n_pg, start = ring[0];
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        int hh = i / n_pg, p = i % n_pg;
        table[((size_t)slot * heads + hh) * g.width + p] = free_ids[((size_t)start + i) % g.n_pages];
    }
    __syncthreads();   /* every thread read ring before thread 0 moves it */
    if (threadIdx.x == 0) {
        ring[0] = (int)(((size_t)start + total) % g.n_pages);
        ring[1] -= total;
    }
}

/* The swap space (leankv.h 4d): block i copies the page at table entry at[i] to swap page
 * ids[i] in pinned host memory (the stores cross PCIe), or back. Pages are multiples of 64
 * bytes (lkv_page_bytes). The CPU's kv_swap_out and kv_swap_in do the same with memcpy. */
__global__ void kv_swap_out(uint8_t *host, const int *at, const int *ids, const uint8_t *pool,
                            const int *table, int page_bytes) {
    const uint4 *src = (const uint4 *)(pool + (size_t)table[at[blockIdx.x]] * page_bytes);
    uint4 *dst = (uint4 *)(host + (size_t)ids[blockIdx.x] * page_bytes);
    for (int j = threadIdx.x; j < page_bytes / 16; j += blockDim.x) dst[j] = src[j];
}

__global__ void kv_swap_in(uint8_t *pool, const int *table, const int *at, const int *ids,
                           const uint8_t *host, int page_bytes) {
    const uint4 *src = (const uint4 *)(host + (size_t)ids[blockIdx.x] * page_bytes);
    uint4 *dst = (uint4 *)(pool + (size_t)table[at[blockIdx.x]] * page_bytes);
    for (int j = threadIdx.x; j < page_bytes / 16; j += blockDim.x) dst[j] = src[j];
}

/* Stores one head vector x (head_dim floats, in shared memory) into its slot of a page,
 * quantized exactly as lkv_quantize does on the CPU (leankv.h 4b), by one warp: the lanes
 * reduce each group's min and max with shuffles (any order gives the same scale and zero),
 * then each lane packs whole bytes of codes. Same inputs, same bytes as the CPU's kv_store. */
__device__ void kv_store(uint8_t *codes, uint16_t *sz, const float *x, int d, int bits,
                         int groups, int lane) {
    if (bits == 16) {
        for (int j = lane; j < d; j += 32) ((uint16_t *)codes)[j] = lkv_f2h(x[j]);
        return;
    }
    int gs = d / groups, per_byte = 8 / bits;
    for (int grp = 0; grp < groups; grp++) {
        const float *xg = x + grp * gs;
        float mn = INFINITY, mx = -INFINITY;
        for (int j = lane; j < gs; j += 32) { mn = fminf(mn, xg[j]); mx = fmaxf(mx, xg[j]); }
        for (int o = 16; o > 0; o >>= 1) {
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        uint16_t sh, zh;
        lkv_quant_params(mn, mx, bits, &sh, &zh);
        if (lane == 0) { sz[2 * grp] = sh; sz[2 * grp + 1] = zh; }
        float scale = lkv_h2f(sh), zero = lkv_h2f(zh);
        for (int b = lane; b < gs / per_byte; b += 32) {
            uint32_t byte = 0;
            for (int k = 0; k < per_byte; k++)
                byte |= (uint32_t)lkv_quant_code(xg[b * per_byte + k], scale, zero, bits) << (k * bits);
            codes[(grp * gs) / per_byte + b] = (uint8_t)byte;
        }
    }
}

/* The page and slot that position pos of head `head` goes to (positions fill the table in
 * order), for kv_append and kv_append_image. On a tiered cache's pages the key's lane 0 also
 * writes the token's score 0 and its position. */
__device__ __forceinline__ uint8_t *kv_append_slot(uint8_t *pool, const int *table,
                                                   const KvGeom &g, size_t head, int pos,
                                                   int is_v, int lane, int *slot) {
    uint8_t *page = pool + (size_t)table[head * g.width + pos / g.tpp] * g.page_bytes;
    *slot = pos % g.tpp;
    if (!is_v && lane == 0 && g.scores >= 0) {
        ((float *)(page + g.scores))[*slot] = 0.0f;
        ((int *)(page + g.pos))[*slot] = pos;
    }
    return page;
}

/* Where a slot's key (is_v 0) or value (is_v 1) lies in a page of geometry g: its codes and
 * its fp16 (scale, zero) pairs, at the vector's bits (leankv.h lkv_layout's segments). Every
 * kernel that stores or loads one vector of a page finds it here. */
struct KvSlot {
    uint8_t *codes;   /* (lkv_code_bytes(d, bits)) the vector's packed codes */
    uint16_t *sz;     /* (groups, 2) its scales and zeros as fp16 bits */
    int bits;         /* its bit width: the tier's kbits or vbits */
};
__device__ __forceinline__ KvSlot kv_slot(const uint8_t *page, const KvGeom &g, int slot, int is_v,
                                          int d) {
    KvSlot v;
    v.bits = is_v ? g.vbits : g.kbits;
    v.codes = (uint8_t *)page + (is_v ? g.v_codes : g.k_codes) + (size_t)slot * lkv_code_bytes(d, v.bits);
    v.sz = (uint16_t *)(page + (is_v ? g.v_sz : g.k_sz) + (size_t)slot * lkv_sz_bytes(g.groups, v.bits));
    return v;
}

/* Appends one token's key (is_v 0, after RoPE) or value (is_v 1) x to head `head` at pos:
 * the page is table[pos / tpp], the slot pos % tpp. One warp; the key's warp also writes the
 * token's metadata (score 0, position). */
__device__ void kv_append(uint8_t *pool, const int *table, const KvGeom &g, size_t head, int pos,
                          int is_v, const float *x, int head_dim, int lane) {
    int slot;
    uint8_t *page = kv_append_slot(pool, table, g, head, pos, is_v, lane, &slot);
    KvSlot v = kv_slot(page, g, slot, is_v, head_dim);
    kv_store(v.codes, v.sz, x, head_dim, v.bits, g.groups, lane);
}

/* kv_store for one vector of HD channels in one group at BITS bits, into img (its codes as a
 * page lays them out) and *img_sz (scale | zero << 16), by one warp, with the arithmetic of
 * lkv_quantize (so the same bytes as the CPU's): each lane holds HD / 32 consecutive channels,
 * min and max go round by shuffles, and the lanes whose codes share a 32-bit word OR them
 * together -- no loop over bytes, so a decode step's new token costs a few hundred cycles. */
template <int HD, int BITS>
__device__ __forceinline__ void kv_quantize_warp(const float *x, uint32_t *img, uint32_t *img_sz,
                                                 int lane) {
    constexpr int CPL = HD / 32;   /* channels a lane: 2 or 4 */
    float v[CPL];
#pragma unroll
    for (int c = 0; c < CPL; c++) v[c] = x[lane * CPL + c];
    if constexpr (BITS == 16) {
#pragma unroll
        for (int c = 0; c < CPL; c += 2)
            img[(lane * CPL + c) / 2] = lkv_f2h(v[c]) | (uint32_t)lkv_f2h(v[c + 1]) << 16;
    } else {
        float mn = v[0], mx = v[0];
#pragma unroll
        for (int c = 1; c < CPL; c++) { mn = fminf(mn, v[c]); mx = fmaxf(mx, v[c]); }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        uint16_t sh, zh;
        lkv_quant_params(mn, mx, BITS, &sh, &zh);
        if (lane == 0) *img_sz = sh | (uint32_t)zh << 16;
        float scale = lkv_h2f(sh), zero = lkv_h2f(zh);
        uint32_t w = 0;   /* channel j's code sits at bit j BITS of the vector (low bits first) */
#pragma unroll
        for (int c = 0; c < CPL; c++) w |= (uint32_t)lkv_quant_code(v[c], scale, zero, BITS) << (c * BITS);
        constexpr int LB = CPL * BITS, LPW = 32 / LB;   /* bits a lane; lanes a word */
        w <<= (lane % LPW) * LB;
#pragma unroll
        for (int o = 1; o < LPW; o <<= 1) w |= __shfl_xor_sync(0xffffffffu, w, o);
        if (lane % LPW == 0) img[lane / LPW] = w;
    }
}

/* kv_append through shared memory: the vector is quantized into img and img_sz
 * (kv_quantize_warp), which the caller reads back instead of the page, and the warp then
 * copies them into the page. One warp. */
template <int HD, int BITS>
__device__ void kv_append_image(uint32_t *img, uint32_t *img_sz, uint8_t *pool, const int *table,
                                const KvGeom &g, size_t head, int pos, int is_v, const float *x,
                                int lane) {
    constexpr int CW = HD * BITS / 32;   /* code words */
    kv_quantize_warp<HD, BITS>(x, img, img_sz, lane);
    __syncwarp();
    int slot;
    uint8_t *page = kv_append_slot(pool, table, g, head, pos, is_v, lane, &slot);
    uint32_t *codes = (uint32_t *)(page + (is_v ? g.v_codes : g.k_codes)) + (size_t)slot * CW;
    for (int j = lane; j < CW; j += 32) codes[j] = img[j];
    if (BITS < 16 && lane == 0) ((uint32_t *)(page + (is_v ? g.v_sz : g.k_sz)))[slot] = *img_sz;
}

/* ---- Two tiers (--kv leankv): the memory manager's kernels, placement and the decode policy.
 * Each is the twin of a leankv.c function of the same name, run for every head at once. A head
 * of a two-tier cache keeps its own counts (n_tok, n_pg) and its table holds high pages from the
 * left, low pages from the right (leankv.h 4c); the host never sees a page id. */

/* page of token i of a tier of head `head`, and its slot in that page */
__device__ __forceinline__ uint8_t *kv_page(uint8_t *pool, const int *table, const KvGeom &g,
                                            size_t head, int tier, int i, int *slot) {
    int k = kv_page_index(g, i);
    *slot = i - k * g.tpp;
    return pool + (size_t)table[head * g.width + (tier ? g.width - 1 - k : k)] * g.page_bytes;
}

/* one warp stores a key (is_v 0) or a value (is_v 1) into a slot of a page of tier geometry g */
__device__ void kv_put_vec(uint8_t *page, const KvGeom &g, int slot, int is_v, const float *x,
                           int d, int lane) {
    KvSlot v = kv_slot(page, g, slot, is_v, d);
    kv_store(v.codes, v.sz, x, d, v.bits, g.groups, lane);
}

/* element j of the key (is_v 0) or value (is_v 1) in a slot, dequantized as the CPU's kv_load
 * does (leankv.h lkv_dequant_at: the same fused multiply-add on both sides) */
__device__ __forceinline__ float kv_load_at(const uint8_t *page, const KvGeom &g, int slot,
                                            int is_v, int d, int j) {
    KvSlot v = kv_slot(page, g, slot, is_v, d);
    return lkv_dequant_at(v.codes, v.sz, d, v.bits, g.groups, j);
}

/* the whole key (is_v 0) or value (is_v 1) in a slot into x (d), as the CPU's kv_load
 * dequantizes it (leankv.h lkv_dequantize: each scale and zero converted once a group, where
 * kv_load_at converts them for every element). kv_place_head stages with it: element by
 * element, staging was 82% of that kernel's instructions (ncu, H200: 415 -> 312 us a
 * 1,024-token SmolLM2 prompt). */
__device__ __forceinline__ void kv_load_vec(const uint8_t *page, const KvGeom &g, int slot,
                                            int is_v, int d, float *x) {
    KvSlot v = kv_slot(page, g, slot, is_v, d);
    lkv_dequantize(v.codes, v.sz, d, v.bits, g.groups, x);
}

/* Step 1, prepare: each head of `slot` (heads = n_layers * n_kv_heads of them) says what it
 * takes or gives; heads not involved keep want = 0. */
__global__ void kv_prepare_reserve(int *want, const int *n_pg, int slot, int heads, int need) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= heads) return;
    size_t hh = (size_t)slot * heads + i;
    int have = n_pg[hh * 2];
    want[hh * 2] = have < need ? need - have : 0;
}

__global__ void kv_prepare_release(int *want, const int *n_pg, int *n_tok, int *plan, int slot,
                                   int heads) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= heads) return;
    size_t hh = (size_t)slot * heads + i;
    for (int t = 0; t < 2; t++) { want[hh * 2 + t] = n_pg[hh * 2 + t]; n_tok[hh * 2 + t] = 0; }
    plan[hh * 3] = LKV_CASE_NONE;
}

/* the pages each planned head of the step's rows takes (kv_take_planned's prepare) */
__global__ void kv_prepare_planned(int *want, const int *plan, const int *n_tok, const int *n_pg,
                                   const int *row_slot, const int *row_pos, int n_rows, int heads,
                                   int tpp_high, int tpp_low) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * heads || row_pos[i / heads] < 0) return;
    size_t hh = (size_t)row_slot[i / heads] * heads + i % heads;
    int c = plan[hh * 3];
    if (c == LKV_CASE_NONE) return;
    want[hh * 2] = lkv_case_pages(c, LKV_HIGH, n_tok[hh * 2], n_pg[hh * 2], tpp_high);
    want[hh * 2 + 1] = lkv_case_pages(c, LKV_LOW, n_tok[hh * 2 + 1], n_pg[hh * 2 + 1], tpp_low);
}

/* step 2, scan (cub's exclusive sum, then this): ring[2] = the total */
__global__ void kv_total(int *ring, const int *want, const int *offset, int n) {
    ring[2] = offset[n - 1] + want[n - 1];
}

/* Step 3, apply: entry i (head i / 2, tier i % 2) takes the free ids at its offset from the
 * front of the ring as its tier's next pages, or writes the ids of its tier's last pages at its
 * offset past the end. The ranges are disjoint, so every head runs at once; kv_ring_update
 * then moves the ring's ends. */
__global__ void kv_apply_take(int *table, const int *free_ids, int *want, const int *offset,
                              int *n_pg, const int *ring, int n, int width, int n_pages) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || want[i] == 0) return;
    int w = want[i], t = i % 2, *tab = table + (size_t)(i / 2) * width;
    for (int k = 0; k < w; k++) {
        int idx = n_pg[i] + k;
        tab[t ? width - 1 - idx : idx] = free_ids[((size_t)ring[0] + offset[i] + k) % n_pages];
    }
    n_pg[i] += w;
    want[i] = 0;
}

__global__ void kv_apply_give(int *free_ids, const int *table, int *want, const int *offset,
                              int *n_pg, const int *ring, int n, int width, int n_pages) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || want[i] == 0) return;
    int w = want[i], t = i % 2;
    const int *tab = table + (size_t)(i / 2) * width;
    for (int k = 0; k < w; k++) {
        int idx = n_pg[i] - w + k;
        free_ids[((size_t)ring[0] + ring[1] + offset[i] + k) % n_pages] =
            tab[t ? width - 1 - idx : idx];
    }
    n_pg[i] -= w;
    want[i] = 0;
}

__global__ void kv_ring_update(int *ring, int take, int n_pages) {
    if (take) { ring[0] = (int)(((size_t)ring[0] + ring[2]) % n_pages); ring[1] -= ring[2]; }
    else ring[1] += ring[2];
}

/* (m, i) = the lower of (m, i) and (m2, i2): the lower mean, on a tie the lower index (the
 * CPU's kv_lowest scans in index order with a strict <); index -1 = none */
__device__ __forceinline__ void lowest_of(float *m, int *i, float m2, int i2) {
    if (i2 >= 0 && (*i < 0 || m2 < *m || (m2 == *m && i2 < *i))) { *m = m2; *i = i2; }
}

/* Decides the case of every head of every row for the token at the row's position (leankv.h
 * 4c), before the step: L and R are the eligible tokens of lowest mean in the high and low
 * tiers. Each half of the block scans one tier, side by side (a block per tier one after the
 * other made two chains of loads and two reductions). Adds the pages the case needs to
 * row_need[row], which the host reads: the one number per step that leaves the GPU. Block
 * (layer * n_kv_heads + h, row). */
#define PLAN_THREADS 128
__global__ void __launch_bounds__(PLAN_THREADS)
kv_plan_step(int *plan, int *row_need, uint8_t *pool, const int *table, KvGeom g0, KvGeom g1,
             const int *n_tok, const int *n_pg, const LkvPolicy *policy, const int *row_slot,
             const int *row_pos) {
    constexpr int HALF = PLAN_THREADS / 2, WARPS = PLAN_THREADS / 32;
    __shared__ float sm_m[WARPS];
    __shared__ int sm_i[WARPS];
    int r = blockIdx.y, n = row_pos[r];
    if (n < 0) return;
    int heads = g0.n_layers * g0.n_kv_heads, slot = row_slot[r];
    size_t hh = (size_t)slot * heads + blockIdx.x;
    LkvPolicy p = policy[slot];
    int t = threadIdx.x / HALF;   /* the tier this half scans */
    const KvGeom g = t ? g1 : g0;
    float best = INFINITY;
    int bi = -1, nt = n_tok[hh * 2 + t];
#pragma unroll 4   /* several tokens' loads in flight: a thread's are independent */
    for (int i = threadIdx.x % HALF; i < nt; i += HALF) {
        int s;
        const uint8_t *page = kv_page(pool, table, g, hh, t, i, &s);
        int pos = ((const int *)(page + g.pos))[s];
        float score = ((const float *)(page + g.scores))[s];
        if (!lkv_eligible(pos, n, p.window)) continue;
        lowest_of(&best, &bi, lkv_mean(score, n, pos, p.first), i);
    }
    for (int o = 16; o > 0; o >>= 1)
        lowest_of(&best, &bi, __shfl_xor_sync(0xffffffffu, best, o),
                  __shfl_xor_sync(0xffffffffu, bi, o));
    if (threadIdx.x % 32 == 0) { sm_m[threadIdx.x / 32] = best; sm_i[threadIdx.x / 32] = bi; }
    __syncthreads();
    if (threadIdx.x) return;
    float m[2] = {INFINITY, INFINITY};
    int idx[2] = {-1, -1};
    for (int w = 0; w < WARPS; w++) lowest_of(&m[w / (WARPS / 2)], &idx[w / (WARPS / 2)], sm_m[w], sm_i[w]);
    int c = lkv_decode_case(m[0], m[1], n, p.alpha_high, p.alpha_low);
    plan[hh * 3] = c; plan[hh * 3 + 1] = idx[0]; plan[hh * 3 + 2] = idx[1];
    int pages = lkv_case_pages(c, LKV_HIGH, n_tok[hh * 2], n_pg[hh * 2], g0.tpp) +
                lkv_case_pages(c, LKV_LOW, n_tok[hh * 2 + 1], n_pg[hh * 2 + 1], g1.tpp);
    if (pages) atomicAdd(&row_need[r], pages);
}

/* Prefill significance (section 3): each prompt row at or after the slot's first counted row
 * adds its probabilities exp(s - M) / L (the scores s attention kept in raw, the max M and sum
 * L that attention_prefill_mma, or attention_combine after the per-row kernel, left in ml) to
 * its query head's sums. A prompt chunk's rows are consecutive positions of one slot (row r is
 * at row_pos[0] + r), so token t's rows are those from max(first, t) on. PSCORE_PARTS threads
 * share a token, each summing every PSCORE_PARTS-th of its rows in order; the parts are added
 * in a fixed order, so the sum differs from the CPU's row after row by rounding only. Measured
 * (H100, ncu, the second 512-row chunk of a 1,024-token prompt): 57 us a launch with a thread
 * per token walking every row of the chunk, 22 us walking only the counted rows, 8.8 us
 * with four parts. Eight parts, twice the loads in flight: 10.8 -> 7.5 us a launch (H200,
 * 1,024-row prompts). Block (query head, PSCORE_TOKENS tokens); a warp is 32 tokens of one
 * part. */
#define PSCORE_TOKENS 32
#define PSCORE_PARTS 8
static_assert(PSCORE_PARTS == 8, "kv_score_prefill adds its eight parts by name");
__global__ void __launch_bounds__(PSCORE_TOKENS * PSCORE_PARTS)
kv_score_prefill(float *pscore, const float *raw, const float *ml, const int *row_slot,
                 const int *row_pos, int n_rows, const LkvPolicy *policy, int layer,
                 int n_heads, int ctx) {
    __shared__ float part[PSCORE_PARTS][PSCORE_TOKENS];
    int head = blockIdx.x, k = threadIdx.x / PSCORE_TOKENS, tl = threadIdx.x % PSCORE_TOKENS;
    int t = blockIdx.y * PSCORE_TOKENS + tl;
    if (n_rows == 0) return;
    int pos0 = row_pos[0], first = policy[row_slot[0]].first;
    float v = 0.0f;
#pragma unroll 8   /* every load of the thread's rows in flight at once */
    for (int r = max(max(first, t) - pos0, 0) + k; t < ctx && r < n_rows; r += PSCORE_PARTS) {
        size_t at = (size_t)r * n_heads + head;
        v += __expf(raw[at * ctx + t] - ml[at * 2]) / ml[at * 2 + 1];
    }
    part[k][tl] = v;
    __syncthreads();
    if (k || t >= ctx) return;
    pscore[((size_t)layer * n_heads + head) * ctx + t] +=
        ((part[0][tl] + part[1][tl]) + (part[2][tl] + part[3][tl])) +
        ((part[4][tl] + part[5][tl]) + (part[6][tl] + part[7][tl]));
}

/* Prefill placement of every (layer, KV head) of slot (leankv.c kv_place_head), after the
 * whole prompt of n tokens is in the high tier at index = position. Block (KV head, layer):
 *   1. each token's score (the max over the GQA group of its query heads' sums) goes into its
 *      page; eligible tokens are classified; low ones are staged in fp32 (dequantized exactly
 *      as the CPU does) before anything moves
 *   2. the high tier is compacted in place, a tile of tokens at a time (every read of a tile
 *      before any write: a token only ever moves to a lower index)
 *   3. the table becomes [high pages | spare ... low pages], as the CPU arranges it
 *   4. the staged low tokens are quantized at the low precision into their pages, one thread
 *      per token with leankv.h's lkv_quantize -- the very code the CPU runs
 * want[high] gets the spare pages, which the caller gives back for all heads at once.
 * Dynamic shared memory: PLACE_THREADS tokens of high-tier words, width ints, n bytes. */
#define PLACE_THREADS 256
__global__ void __launch_bounds__(PLACE_THREADS)
kv_place_head(uint8_t *pool, int *table, KvGeom g0, KvGeom g1, int *n_tok, int *n_pg, int *want,
              const float *pscore, float *stage, const LkvPolicy *policy, int slot, int n,
              int n_heads, int gq, int head_dim, int ctx) {
    typedef cub::BlockScan<int, PLACE_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    extern __shared__ uint32_t place_sm[];
    int d = head_dim, kvh = blockIdx.x, layer = blockIdx.y, tid = threadIdx.x;
    int kc = lkv_code_bytes(d, g0.kbits) / 4, ks = lkv_sz_bytes(g0.groups, g0.kbits) / 4;
    int vc = lkv_code_bytes(d, g0.vbits) / 4, vs = lkv_sz_bytes(g0.groups, g0.vbits) / 4;
    int words = kc + ks + vc + vs + 2;           /* a high-tier token, in 32-bit words */
    uint32_t *tile = place_sm;                   /* (PLACE_THREADS, words) */
    int *tab_old = (int *)(place_sm + PLACE_THREADS * words);   /* (width) */
    uint8_t *tier_of = (uint8_t *)(tab_old + g0.width);          /* (n) */
    size_t hh = kv_head(g0, slot, layer, kvh);
    LkvPolicy p = policy[slot];
    const float *ps = pscore + ((size_t)layer * n_heads + kvh * gq) * ctx;
    float *st = stage + ((size_t)layer * g0.n_kv_heads + kvh) * ctx * (2 * d + 2);   /* (ctx, 2d + 2):
                                                                    k, v, score, pos */
    int nl = 0;
    for (int t0 = 0; t0 < n; t0 += PLACE_THREADS) {       /* 1. classify, stage */
        int i = t0 + tid, low = 0, s;
        if (i < n) {
            float score = ps[i];
            for (int g = 1; g < gq; g++) score = fmaxf(score, ps[(size_t)g * ctx + i]);
            uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, i, &s);
            int pos = ((int *)(page + g0.pos))[s];
            int tier = lkv_eligible(pos, n, p.window)
                           ? lkv_classify(lkv_mean(score, n, pos, p.first), n, p.alpha_high,
                                          p.alpha_low)
                           : LKV_HIGH;
            tier_of[i] = (uint8_t)tier;
            ((float *)(page + g0.scores))[s] = score;
            low = tier == LKV_LOW;
        }
        int off, total;
        Scan(scan_tmp).ExclusiveSum(low, off, total);
        if (low) {
            uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, i, &s);
            float *x = st + (size_t)(nl + off) * (2 * d + 2);
            kv_load_vec(page, g0, s, 0, d, x);
            kv_load_vec(page, g0, s, 1, d, x + d);
            x[2 * d] = ((float *)(page + g0.scores))[s];
            x[2 * d + 1] = __int_as_float(((int *)(page + g0.pos))[s]);
        }
        nl += total;
        __syncthreads();   /* scan_tmp is reused */
    }
    int nh = 0;
    for (int t0 = 0; t0 < n; t0 += PLACE_THREADS) {       /* 2. compact the high tier */
        int i = t0 + tid, high = i < n && tier_of[i] == LKV_HIGH, off, total, s;
        Scan(scan_tmp).ExclusiveSum(high, off, total);
        uint32_t *w = tile + (size_t)tid * words;
        if (high) {
            const uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, i, &s);
            const uint32_t *kcw = (const uint32_t *)(page + g0.k_codes) + (size_t)s * kc;
            const uint32_t *ksw = (const uint32_t *)(page + g0.k_sz) + (size_t)s * ks;
            const uint32_t *vcw = (const uint32_t *)(page + g0.v_codes) + (size_t)s * vc;
            const uint32_t *vsw = (const uint32_t *)(page + g0.v_sz) + (size_t)s * vs;
            int o = 0;
            for (int j = 0; j < kc; j++) w[o++] = kcw[j];
            for (int j = 0; j < ks; j++) w[o++] = ksw[j];
            for (int j = 0; j < vc; j++) w[o++] = vcw[j];
            for (int j = 0; j < vs; j++) w[o++] = vsw[j];
            w[o++] = ((const uint32_t *)(page + g0.scores))[s];
            w[o++] = ((const uint32_t *)(page + g0.pos))[s];
        }
        __syncthreads();   /* the whole tile is read before any of it is written */
        if (high && nh + off != i) {
            uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, nh + off, &s);
            uint32_t *kcw = (uint32_t *)(page + g0.k_codes) + (size_t)s * kc;
            uint32_t *ksw = (uint32_t *)(page + g0.k_sz) + (size_t)s * ks;
            uint32_t *vcw = (uint32_t *)(page + g0.v_codes) + (size_t)s * vc;
            uint32_t *vsw = (uint32_t *)(page + g0.v_sz) + (size_t)s * vs;
            int o = 0;
            for (int j = 0; j < kc; j++) kcw[j] = w[o++];
            for (int j = 0; j < ks; j++) ksw[j] = w[o++];
            for (int j = 0; j < vc; j++) vcw[j] = w[o++];
            for (int j = 0; j < vs; j++) vsw[j] = w[o++];
            ((uint32_t *)(page + g0.scores))[s] = w[o++];
            ((uint32_t *)(page + g0.pos))[s] = w[o++];
        }
        nh += total;
        __syncthreads();
    }
    int np = n_pg[hh * 2], ph = lkv_pages_for(nh, g0.tpp), pl = lkv_pages_for(nl, g1.tpp);
    int spare = np - ph - pl, *tab = table + hh * g0.width;
    if (spare < 0) {   /* leankv.h 4c proves this cannot happen */
        if (tid == 0) printf("leankv: internal: placement needs %d pages, the head holds %d\n", ph + pl, np);
        __trap();
    }
    for (int k = tid; k < np; k += blockDim.x) tab_old[k] = tab[k];
    __syncthreads();                                       /* 3. the table */
    for (int k = tid; k < spare; k += blockDim.x) tab[ph + k] = tab_old[ph + pl + k];
    for (int k = tid; k < pl; k += blockDim.x) tab[g0.width - 1 - k] = tab_old[ph + k];
    __syncthreads();
    for (int j = tid; j < nl; j += blockDim.x) {           /* 4. the low tier */
        int s;
        uint8_t *page = kv_page(pool, table, g1, hh, LKV_LOW, j, &s);
        const float *x = st + (size_t)j * (2 * d + 2);
        KvSlot k = kv_slot(page, g1, s, 0, d), v = kv_slot(page, g1, s, 1, d);
        lkv_quantize(x, d, k.bits, g1.groups, k.codes, k.sz);
        lkv_quantize(x + d, d, v.bits, g1.groups, v.codes, v.sz);
        ((float *)(page + g1.scores))[s] = x[2 * d];
        ((int *)(page + g1.pos))[s] = __float_as_int(x[2 * d + 1]);
    }
    if (tid == 0) {
        n_tok[hh * 2] = nh; n_tok[hh * 2 + 1] = nl;
        n_pg[hh * 2] = ph + spare; n_pg[hh * 2 + 1] = pl;
        want[hh * 2] = spare; want[hh * 2 + 1] = 0;
    }
}

/* ----------------------------------------------------------------------------------------
 * Forward pass over a batch of rows. The kernels carry the names of their CPU twins. */

/* sum of v over the block (blockDim.x a multiple of 32, at most 1024) */
__device__ float block_sum(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();                /* part may still be read by a previous call */
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? part[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* x[r] = tok_embeddings[token[r]] */
__global__ void embed(float *x, const __half *emb, const int *row_token, int dim) {
    grid_wait();
    grid_release();
    const __half *e = emb + (size_t)row_token[blockIdx.x] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        x[(size_t)blockIdx.x * dim + i] = __half2float(e[i]);
}

/* The two pointwise formulas of leankv.c's rmsnorm and swiglu, each written once here for the
 * kernels that apply them (rmsnorm and matvec's MV_NORM prologue; swiglu and MV_SWIGLU), so
 * that every kernel rounds alike -- batch invariance depends on it:
 *   RMSNorm  y = w * (x * inv),  inv = 1 / sqrt(sum(x^2) / n + eps)
 *   SwiGLU   h = silu(g) * u = g / (1 + e^-g) * u */
__device__ __forceinline__ float rms_inv(float ss, int n, float eps) { return 1.0f / sqrtf(ss / n + eps); }
__device__ __forceinline__ float rms_scale(float w, float x, float inv) { return w * (x * inv); }
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* One block per output row b, reading row r = rows ? rows[b] : b:
 *   x[r] += y[r]  (the residual add of the previous block, when y is given)
 *   out[b] = x[r] / sqrt(mean(x[r]^2) + eps) * w
 * Each thread keeps its (at most RMS_PER_THREAD) elements in registers, so every load of x,
 * y and w goes out at once and x is read from memory once. */
#define RMS_PER_THREAD 8
__global__ void rmsnorm(__half *out, float *x, const float *y, const float *w, const int *rows,
                        int dim, float eps) {
    int b = blockIdx.x, r = rows ? rows[b] : b;
    float *xr = x + (size_t)r * dim;
    float v[RMS_PER_THREAD], ss = 0.0f;
#pragma unroll
    for (int k = 0; k < RMS_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < dim ? xr[i] + (y ? y[(size_t)r * dim + i] : 0.0f) : 0.0f;
        ss += v[k] * v[k];
    }
    if (y) {
#pragma unroll
        for (int k = 0; k < RMS_PER_THREAD; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < dim) xr[i] = v[k];
        }
    }
    ss = block_sum(ss);
    float inv = rms_inv(ss, dim, eps);
#pragma unroll
    for (int k = 0; k < RMS_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < dim) out[(size_t)b * dim + i] = __float2half_rn(rms_scale(w[i], v[k], inv));
    }
}

/* threads for rmsnorm over dim: a whole number of warps, each thread RMS_PER_THREAD at most */
static int rmsnorm_threads(int dim) {
    int t = (dim + RMS_PER_THREAD - 1) / RMS_PER_THREAD;
    return (t + 31) / 32 * 32;
}

/* y (rows, d) = x (rows, n) W^T with W stored (d, n), as the CPU's matmul(y, x, W, n, d) does
 * for one row. cuBLAS is column-major, so it sees our row-major W (d, n) as an (n, d) matrix
 * and x as (n, rows); it computes y^T (d, rows) = op_T(W) x, which in row-major is y. fp16
 * inputs, fp32 accumulation on the tensor cores, fp32 output. */
static void matmul(cublasHandle_t blas, float *y, const __half *x, const __half *W, int rows,
                   int n, int d) {
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, d, rows, n, &one, W, CUDA_R_16F, n,
                              x, CUDA_R_16F, n, &zero, y, CUDA_R_32F, d, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
}

/* Small engines (at most MATVEC_ROWS sequences: batch 1 above all): there a projection reads
 * its weights for one or two rows and a step is ~150 launches long, so what counts is latency,
 * not FLOPs. matvec is matmul for those rows, fused with the kernel before it and the residual
 * add after it; with attention_finish merging the splits, a layer takes 5 launches, not 9:
 *   y[r] = W in[r]   or, with accumulate,   y[r] += W in[r]   (y = x: the residual add)
 *   MV_HALF:   in = a fp16 row (the attention output o)
 *   MV_NORM:   in = rmsnorm(x[r]) * w, rounded to fp16 as rmsnorm's xb is
 *   MV_SWIGLU: in = silu(g) * u of gu's row, rounded to fp16 as swiglu's hb is
 * One warp per output element; each lane fetches its n/256 16-byte pieces of the weight row
 * before grid_wait(), so the weights stream while the kernel before is still finishing. Every
 * block builds all rows of `in` in shared memory (a few KB, from L2). */
#define MATVEC_ROWS 2          /* rows of a step this kernel serves (measured: at 4 rows, the
                                  rows' inputs one after the other make it slower than cuBLAS) */
#define MATVEC_CHUNKS 8        /* 16-byte weight pieces per lane: n <= 8 * 256 */
#define MATVEC_THREADS 128
enum { MV_HALF, MV_NORM, MV_SWIGLU };
template <int IN>
__global__ void __launch_bounds__(MATVEC_THREADS)
matvec(float *y, int accumulate, const void *in, const float *norm_w, const __half *W, int rows,
       int n, int d, float eps) {
    extern __shared__ float xin[];   /* (rows, n) the inputs, as floats */
    int lane = threadIdx.x % 32;
    int i = blockIdx.x * (MATVEC_THREADS / 32) + threadIdx.x / 32;   /* output element */
    uint4 w[MATVEC_CHUNKS];
#pragma unroll
    for (int k = 0; k < MATVEC_CHUNKS; k++) {   /* weights do not depend on earlier kernels */
        int j = (k * 32 + lane) * 8;
        if (i < d && j < n) w[k] = __ldg((const uint4 *)(W + (size_t)i * n + j));
    }
    grid_wait();
    grid_release();
    /* the inputs: every load of a row issued at once (4 float4 a thread at most), then used */
    constexpr int PER = 256 * MATVEC_CHUNKS / 4 / MATVEC_THREADS;
    int n4 = n / 4;
    for (int r = 0; r < rows; r++) {
        float4 a[PER], b[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int j = threadIdx.x + k * MATVEC_THREADS;
            if (j >= n4) break;
            if (IN == MV_HALF) {
                uint2 h = ((const uint2 *)in)[(size_t)r * n4 + j];
                float2 lo = __half22float2(*(__half2 *)&h.x), hi = __half22float2(*(__half2 *)&h.y);
                a[k] = make_float4(lo.x, lo.y, hi.x, hi.y);
            } else if (IN == MV_NORM) {
                a[k] = ((const float4 *)in)[(size_t)r * n4 + j];
            } else {   /* gu's row: g, then u */
                a[k] = ((const float4 *)in)[(size_t)r * 2 * n4 + j];
                b[k] = ((const float4 *)in)[(size_t)r * 2 * n4 + n4 + j];
            }
        }
        float inv = 0.0f;
        if (IN == MV_NORM) {
            float ss = 0.0f;
#pragma unroll
            for (int k = 0; k < PER; k++)
                if (threadIdx.x + k * MATVEC_THREADS < n4)
                    ss += a[k].x * a[k].x + a[k].y * a[k].y + a[k].z * a[k].z + a[k].w * a[k].w;
            inv = rms_inv(block_sum(ss), n, eps);
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int j = threadIdx.x + k * MATVEC_THREADS;
            if (j >= n4) break;
            float v[4] = {a[k].x, a[k].y, a[k].z, a[k].w};
            if (IN == MV_NORM) {
                float4 nw = ((const float4 *)norm_w)[j];
                float w4[4] = {nw.x, nw.y, nw.z, nw.w};
#pragma unroll
                for (int e = 0; e < 4; e++) v[e] = __half2float(__float2half_rn(rms_scale(w4[e], v[e], inv)));
            } else if (IN == MV_SWIGLU) {
                float u[4] = {b[k].x, b[k].y, b[k].z, b[k].w};
#pragma unroll
                for (int e = 0; e < 4; e++)
                    v[e] = __half2float(__float2half_rn(silu_mul(v[e], u[e])));
            }
            ((float4 *)(xin + r * n))[j] = make_float4(v[0], v[1], v[2], v[3]);
        }
    }
    __syncthreads();
    if (i >= d) return;
    float acc[MATVEC_ROWS] = {};
#pragma unroll
    for (int k = 0; k < MATVEC_CHUNKS; k++) {
        int j = (k * 32 + lane) * 8;
        if (j >= n) break;
        const __half2 *wh = (const __half2 *)&w[k];
        float2 wf[4];
#pragma unroll
        for (int e = 0; e < 4; e++) wf[e] = __half22float2(wh[e]);
#pragma unroll
        for (int r = 0; r < MATVEC_ROWS; r++) {
            if (r >= rows) break;
            const float4 *xv = (const float4 *)(xin + r * n + j);
            float4 a = xv[0], b = xv[1];
            acc[r] += wf[0].x * a.x + wf[0].y * a.y + wf[1].x * a.z + wf[1].y * a.w +
                      wf[2].x * b.x + wf[2].y * b.y + wf[3].x * b.z + wf[3].y * b.w;
        }
    }
#pragma unroll
    for (int r = 0; r < MATVEC_ROWS; r++) {
        if (r >= rows) break;
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) y[(size_t)r * d + i] = accumulate ? y[(size_t)r * d + i] + v : v;
    }
}

/* y (rows, d) (+)= W in, through matvec; see there for IN */
template <int IN>
static void matvec_launch(int pdl, cudaStream_t st, float *y, int accumulate, const void *in,
                          const float *norm_w, const __half *W, int rows, int n, int d,
                          float eps) {
    int per_block = MATVEC_THREADS / 32;
    launch_pdl(pdl, matvec<IN>, dim3((d + per_block - 1) / per_block), dim3(MATVEC_THREADS),
               (size_t)rows * n * sizeof(float), st, y, accumulate, in, norm_w, W, rows, n, d,
               eps);
}

/* RoPE for pair p of one head vector x (its biases xb, or NULL) at position pos: rotates
 * channels (a, b) by the angle pos * theta^(-2p/head_dim) -- cos and sin come from a table the
 * host filled with the CPU rope's own formulas. rotate = 0 passes the pair through (values). */
__device__ __forceinline__ void rope_pair(const float *x, const float *xb, const float2 *cos_sin,
                                          int pos, int p, int head_dim, int style, int rotate,
                                          int *a, int *b, float *y0, float *y1) {
    int half = head_dim / 2;
    *a = style == LKV_ROPE_INTERLEAVED ? 2 * p : p;
    *b = style == LKV_ROPE_INTERLEAVED ? 2 * p + 1 : p + half;
    float x0 = x[*a], x1 = x[*b];
    if (xb) { x0 += xb[*a]; x1 += xb[*b]; }
    if (!rotate) { *y0 = x0; *y1 = x1; return; }
    float2 cs = cos_sin[(size_t)pos * half + p];
    *y0 = x0 * cs.x - x1 * cs.y;
    *y1 = x0 * cs.y + x1 * cs.x;
}

/* the rotated key and the value of one KV head of one row, into kv_sm (2, head_dim) floats;
 * threads tid .. of nthreads share the channel pairs (half of them keys, half values) */
__device__ void kv_rotate_head(float *kv_sm, const float *k, const float *v, const float *bk,
                               const float *bv, const float2 *cos_sin, int pos, int head_dim,
                               int style, int tid, int nthreads) {
    for (int i = tid; i < head_dim; i += nthreads) {
        int is_v = i >= head_dim / 2, p = i % (head_dim / 2), a, b;
        float y0, y1;
        rope_pair(is_v ? v : k, is_v ? bv : bk, cos_sin, pos, p, head_dim, style, !is_v, &a, &b,
                  &y0, &y1);
        kv_sm[is_v * head_dim + a] = y0;
        kv_sm[is_v * head_dim + b] = y1;
    }
}

/* One block per row: adds the biases, rotates every query and key head (rope_pair), writes the
 * queries to q, and appends the keys and values to the row's pages (kv_append: one warp per
 * vector, since quantizing a vector needs its min and max). Padding rows (pos < 0) do nothing.
 * Used for prompt chunks; a decode step does this inside attention_paged.
 * Dynamic shared memory: (n_kv_heads, 2, head_dim) floats. */
__global__ void rope(float *q, uint8_t *pool, const float *qkv, const float *bqkv,
                     const float2 *cos_sin, const int *table, const int *row_slot,
                     const int *row_pos, int layer, KvGeom g, int n_heads, int head_dim,
                     int style) {
    extern __shared__ float kv_sm[];
    int r = blockIdx.x, pos = row_pos[r];
    if (pos < 0) return;   /* the whole block leaves */
    int half = head_dim / 2, n_kv = g.n_kv_heads;
    int QD = n_heads * head_dim, KVD = n_kv * head_dim, ld = QD + 2 * KVD;
    const float *in = qkv + (size_t)r * ld;
    for (int i = threadIdx.x; i < n_heads * half; i += blockDim.x) {
        int h = i / half, a, b;
        float y0, y1;
        rope_pair(in + h * head_dim, bqkv ? bqkv + h * head_dim : NULL, cos_sin, pos, i % half,
                  head_dim, style, 1, &a, &b, &y0, &y1);
        q[(size_t)r * QD + h * head_dim + a] = y0;
        q[(size_t)r * QD + h * head_dim + b] = y1;
    }
    for (int i = threadIdx.x; i < n_kv * head_dim; i += blockDim.x) {
        int h = i / head_dim, ko = QD + h * head_dim, vo = QD + KVD + h * head_dim;
        kv_rotate_head(kv_sm + 2 * h * head_dim, in + ko, in + vo, bqkv ? bqkv + ko : NULL,
                       bqkv ? bqkv + vo : NULL, cos_sin, pos, head_dim, style, i % head_dim,
                       head_dim);
    }
    __syncthreads();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int vec = warp; vec < 2 * n_kv; vec += blockDim.x / 32)
        kv_append(pool, table, g, kv_head(g, row_slot[r], layer, vec / 2), pos, vec % 2,
                  kv_sm + vec * head_dim, head_dim, lane);
}

/* Writes a decode step's new token at pos into head hh (KV head kvh of row r) as its planned
 * case says (leankv.c kv_write_token): SWAP and DEMOTE re-quantize L at the low precision (into
 * R's slot, or a new low slot) and the new key (rotated) and value take L's slot; APPEND puts
 * them at the end of the high tier. A block of at least 128 threads: once L is read, warps 0
 * and 1 store its key and value, warps 2 and 3 the new ones, side by side (different slots).
 * The caller syncs before it reads what was written.
 * HD > 0 (attention_pair_mma: one group, the tiers' bits known when compiled): each vector is
 * stored by put_vec_warp, kv_quantize_warp's few shuffles, not kv_store's loops over run-time
 * bits and groups; the same bytes (leankv.h 4b). HD = 0: any tiers (kv_write_token). */
template <int HD, int BITS>
__device__ __forceinline__ void put_vec_warp(uint8_t *page, const KvGeom &g, int slot, int is_v,
                                             const float *x, int lane) {
    constexpr int CW = HD * BITS / 32;   /* code words a vector */
    uint32_t *codes = (uint32_t *)(page + (is_v ? g.v_codes : g.k_codes)) + (size_t)slot * CW;
    kv_quantize_warp<HD, BITS>(x, codes, (uint32_t *)(page + (is_v ? g.v_sz : g.k_sz)) + slot,
                               lane);
}

/* a warp stores key (is_v 0) or value (is_v 1) x into a slot of a page of tier geometry g, whose
 * key and value bits are KB and VB when HD > 0 */
template <int HD, int KB, int VB>
__device__ __forceinline__ void put_vec(uint8_t *page, const KvGeom &g, int slot, int is_v,
                                        const float *x, int d, int lane) {
    if constexpr (HD > 0) {
        if (is_v) put_vec_warp<HD, VB>(page, g, slot, 1, x, lane);
        else put_vec_warp<HD, KB>(page, g, slot, 0, x, lane);
    } else kv_put_vec(page, g, slot, is_v, x, d, lane);
}

template <int HD = 0, int KB0 = 0, int VB0 = 0, int KB1 = 0, int VB1 = 0>
__device__ void write_token(uint8_t *pool, const int *table, const KvGeom &g0, const KvGeom &g1,
                            int *n_tok, int *plan, const float *qkv, const float *bqkv,
                            const float2 *cos_sin, int style, size_t hh, int r, int kvh,
                            int pos, int n_heads, int head_dim) {
    __shared__ float nw[2 * 128], old[2 * 128];   /* new and demoted (k, v); head_dim <= 128 */
    __shared__ float old_score;
    __shared__ int old_pos;
    int tid = threadIdx.x;
    int c = plan[hh * 3], L = plan[hh * 3 + 1], R = plan[hh * 3 + 2];
    int nh = n_tok[hh * 2], nl = n_tok[hh * 2 + 1], s;
    int QD = n_heads * head_dim, KVD = g0.n_kv_heads * head_dim;
    const float *in = qkv + (size_t)r * (QD + 2 * KVD);
    int ko = QD + kvh * head_dim, vo = QD + KVD + kvh * head_dim;
    kv_rotate_head(nw, in + ko, in + vo, bqkv ? bqkv + ko : NULL, bqkv ? bqkv + vo : NULL,
                   cos_sin, pos, head_dim, style, tid, blockDim.x);
    int demote = c == LKV_CASE_SWAP || c == LKV_CASE_DEMOTE;
    if (demote) {   /* L, dequantized exactly as the CPU's kv_get */
        const uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, L, &s);
        for (int j = tid; j < 2 * head_dim; j += blockDim.x)
            old[j] = kv_load_at(page, g0, s, j >= head_dim, head_dim, j % head_dim);
        if (tid == 0) {
            old_score = ((const float *)(page + g0.scores))[s];
            old_pos = ((const int *)(page + g0.pos))[s];
        }
    }
    __syncthreads();   /* nw and old are complete: L's slot may be overwritten */
    int warp = tid / 32, lane = tid % 32, is_v = warp % 2;
    if (warp < 2) {
        if (!demote) return;
        uint8_t *page = kv_page(pool, table, g1, hh, LKV_LOW, c == LKV_CASE_SWAP ? R : nl, &s);
        put_vec<HD, KB1, VB1>(page, g1, s, is_v, old + is_v * head_dim, head_dim, lane);
        if (tid == 0) {
            ((float *)(page + g1.scores))[s] = old_score;
            ((int *)(page + g1.pos))[s] = old_pos;
        }
        return;
    }
    if (warp >= 4) return;
    int append = c == LKV_CASE_NONE || c == LKV_CASE_APPEND;
    uint8_t *page = kv_page(pool, table, g0, hh, LKV_HIGH, append ? nh : L, &s);
    put_vec<HD, KB0, VB0>(page, g0, s, is_v, nw + is_v * head_dim, head_dim, lane);
    if (tid == 64) {
        ((float *)(page + g0.scores))[s] = 0.0f;
        ((int *)(page + g0.pos))[s] = pos;
        if (append) n_tok[hh * 2] = nh + 1;
        if (c == LKV_CASE_DEMOTE) n_tok[hh * 2 + 1] = nl + 1;
        plan[hh * 3] = LKV_CASE_NONE;
    }
}

/* write_token for every (row, KV head) of a step: block (KV head, row), 128 threads */
__global__ void __launch_bounds__(128)
kv_write_token(uint8_t *pool, const int *table, KvGeom g0, KvGeom g1, int *n_tok, int *plan,
               const float *qkv, const float *bqkv, const float2 *cos_sin, int style,
               const int *row_slot, const int *row_pos, int layer, int n_heads, int head_dim) {
    grid_wait();
    grid_release();
    int kvh = blockIdx.x, r = blockIdx.y, pos = row_pos[r];
    if (pos < 0) return;
    write_token(pool, table, g0, g1, n_tok, plan, qkv, bqkv, cos_sin, style,
                kv_head(g0, row_slot[r], layer, kvh), r, kvh, pos, n_heads, head_dim);
}

/* What one thread loads of a token's key or value: the codes of its CH channels (8 or 16). */
template <int BYTES> struct Bytes;
template <> struct Bytes<16> { typedef uint4 T; };
template <> struct Bytes<8> { typedef uint2 T; };
template <> struct Bytes<4> { typedef uint32_t T; };
template <> struct Bytes<2> { typedef uint16_t T; };
template <int BITS, int CH> struct CodeVec { typedef typename Bytes<CH * BITS / 8>::T T; };

/* code byte k of w as a float, exactly: 0x4B000000 | c is the float 2^23 + c */
__device__ __forceinline__ float code_byte(uint32_t w, int k) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540 | k)) - 8388608.0f;
}

/* The CH channels a thread loaded, in registers: fp16 values as floats, or codes as floats
 * (the caller applies scale and zero: x = code * scale + zero, leankv.h 4b). Codes are packed
 * low bits first: byte j of a word holds channel j (8 bits), channels 2j and 2j+1 (4 bits:
 * masking the low and the high nibbles leaves one code a byte), or 4j .. 4j+3 (2 bits). */
template <int BITS, int CH>
__device__ __forceinline__ void unpack(typename CodeVec<BITS, CH>::T c, float *f) {
    if constexpr (BITS == 16) {
        const __half2 *h = (const __half2 *)&c;
#pragma unroll
        for (int j = 0; j < CH / 2; j++) {
            float2 a = __half22float2(h[j]);
            f[2 * j] = a.x; f[2 * j + 1] = a.y;
        }
    } else {
        constexpr int BYTES = CH * BITS / 8, NW = BYTES >= 4 ? BYTES / 4 : 1;
        uint32_t w[NW];
        if constexpr (BYTES == 2) w[0] = c;
        else {
#pragma unroll
            for (int i = 0; i < NW; i++) w[i] = ((const uint32_t *)&c)[i];
        }
#pragma unroll
        for (int i = 0; i < NW; i++) {
            if constexpr (BITS == 8) {
#pragma unroll
                for (int j = 0; j < 4; j++) f[4 * i + j] = code_byte(w[i], j);
            } else if constexpr (BITS == 4) {
                uint32_t lo = w[i] & 0x0F0F0F0Fu, hi = (w[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    f[8 * i + 2 * j] = code_byte(lo, j);
                    f[8 * i + 2 * j + 1] = code_byte(hi, j);
                }
            } else {
                constexpr int NB = BYTES >= 4 ? 4 : BYTES;   /* bytes in this word */
#pragma unroll
                for (int sh = 0; sh < 4; sh++) {
                    uint32_t m = (w[i] >> (2 * sh)) & 0x03030303u;
#pragma unroll
                    for (int j = 0; j < NB; j++) f[16 * i + 4 * j + sh] = code_byte(m, j);
                }
            }
        }
    }
}

/* a token's (scale, zero) pair of fp16 bits, as floats */
__device__ __forceinline__ float2 scale_zero(uint32_t sz) {
    return make_float2(__half2float(__ushort_as_half((unsigned short)(sz & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(sz >> 16))));
}

/* Decode attention over the paged cache, for the gq query heads that share KV head kvh:
 *   a_t = softmax_t(q . k_t / sqrt(head_dim)),  o = sum_t a_t v_t,  t = 0 .. pos
 * Block (split, kvh, row); NT tokens at a time, one per group of HD/CH threads, each thread
 * owning CH channels (8, or 16 for codes when registers allow). K and V are read as stored -- fp16, or codes of KB and VB bits with a
 * scale and zero per token and group -- and dequantized in registers, never into memory:
 *   q . k_t = s_t (q . c_t) + z_t sum(q)       sum_t e_t v_t = sum_t (e_t s_t) c_t + sum_t e_t z_t
 * (k_t = s_t c_t + z_t), so a quantized key costs one multiply-add per channel, like fp16.
 * Each token group keeps a running max m, sum l and output acc for its tokens (online softmax,
 * one rescale per STEP tokens), and the groups are merged in shared memory at the end.
 * Reading K and V once for all gq query heads is what grouped-query attention buys. Decode
 * attention only streams K and V, so what counts is bytes in flight: the next ATT_STEP tokens'
 * loads are issued before the current ones are used.
 * Long contexts are cut into splits of pages_per_split pages at fixed boundaries; with more
 * than one split each block writes its unnormalised (acc, m, l) and attention_combine merges.
 * GM is gq rounded up to an instantiated size (1, 2, 3, 4, 8). */
#ifndef ATT_STEP
#define ATT_STEP 3            /* tokens per thread per iteration (measured: 2-4) */
#endif
#ifndef ATT_BLOCKS_PER_SM
#define ATT_BLOCKS_PER_SM 3   /* blocks of attention_paged<64, G <= 4> resident per SM */
#endif
#define ATT_THREADS(HD) ((HD) == 64 ? 128 : 256)   /* threads of a block */
#ifndef ATT_LEAST_PAGES
#define ATT_LEAST_PAGES 8     /* the shortest split of code keys or on tensor cores, in pages
                                 (measured: 4, 8, 16; split_pages) */
#endif

/* What a launch over one tier of a two-tier cache (or for prefill scores) adds to the plain
 * one: per-head token counts instead of positions, the tier's end of the page table, where its
 * splits go among all partials, and the scores q.k/sqrt(d) kept for significance. */
typedef struct {
    const int *n_tok;   /* (heads, 2) tokens per tier, or NULL: token t is position t */
    int tier;           /* LKV_HIGH: table from the left; LKV_LOW: from the right */
    int split_base;     /* this launch's first split among total_splits */
    int total_splits;   /* partials per (row, head); 0: this launch's own splits */
    float *raw;         /* (rows, n_heads, raw_stride) scores of rows at pos >= raw_first, or NULL */
    int raw_first;
    int raw_stride;
    int *arrive;        /* (rows, n_kv_heads) blocks done, or NULL: with splits, the last block
                           of a (row, KV head) merges them (attention_finish); else
                           attention_combine does, in a launch of its own */
    int scores_sm;      /* a decode block that owns its head keeps the scores in shared memory
                           (they fit): (ctx) the tokens' old ones, then raw's (gq, ctx) */
} AttTier;

/* What block (split, KV head kvh = blockIdx.y, row r = blockIdx.z) attends: tokens
 * [t_begin, t_end) of its head's n (a tier's count, or the row's position + 1; 0 for a
 * padding row, pos < 0), and where in at.raw its scores go (kept for significance; a tier's
 * low tokens follow its high ones), -1 when they are not kept -- an int, not a pointer: one
 * register fewer in the loop (gpu_build checks the size). */
typedef struct { size_t head_kv; int pos, n, raw_at, t_begin, t_end; } AttRange;
__device__ __forceinline__ AttRange attention_range(const int *row_slot, const int *row_pos,
                                                    int layer, const KvGeom &g, int n_heads,
                                                    int gq, int pages_per_split,
                                                    const AttTier &at, int split) {
    AttRange a;
    int kvh = blockIdx.y, r = blockIdx.z;
    a.pos = row_pos[r];
    a.head_kv = kv_head(g, row_slot[r], layer, kvh);
    a.n = at.n_tok ? (a.pos >= 0 ? at.n_tok[a.head_kv * 2 + at.tier] : 0) : a.pos + 1;
    a.raw_at = at.raw && a.pos >= 0 && a.pos >= at.raw_first
                   ? (r * n_heads + kvh * gq) * at.raw_stride +
                         (at.n_tok && at.tier ? at.n_tok[a.head_kv * 2] : 0)
                   : -1;
    a.t_begin = split * pages_per_split * g.tpp;
    a.t_end = min(a.t_begin + pages_per_split * g.tpp, a.n);
    return a;
}

/* splits of pages_per_split pages that hold the n tokens of a head */
__device__ __forceinline__ int attention_active(const KvGeom &g, int n, int pages_per_split) {
    return n > 0 ? (n - 1) / (pages_per_split * g.tpp) + 1 : 0;
}

/* A decode step's first work in block (kvh, row r): rope of the gq queries into q_sm, and in
 * the block whose split holds the new token ("mine": no other block reads that page), rope of
 * its key into kv_sm[0 .. HD) and its value into kv_sm[HD .. 2 HD). The caller syncs, then
 * appends the token -- which saves a kernel launch per layer. Returns mine. */
template <int HD>
__device__ __forceinline__ int attention_rope(float *q_sm, float *kv_sm, const float *qkv,
                                              const float *bqkv, const float2 *cos_sin,
                                              int style, const KvGeom &g, int pos, int r,
                                              int kvh, int n_heads, int gq,
                                              int pages_per_split, const AttTier &at,
                                              int split) {
    int QD = n_heads * HD, KVD = g.n_kv_heads * HD;
    const float *in = qkv + (size_t)r * (QD + 2 * KVD);
    for (int i = threadIdx.x; i < gq * HD / 2 && pos >= 0; i += blockDim.x) {
        int off = (kvh * gq + i / (HD / 2)) * HD, a, b;
        float y0, y1;
        rope_pair(in + off, bqkv ? bqkv + off : NULL, cos_sin, pos, i % (HD / 2), HD, style, 1,
                  &a, &b, &y0, &y1);
        q_sm[off - kvh * gq * HD + a] = y0;
        q_sm[off - kvh * gq * HD + b] = y1;
    }
    /* one tier: the block whose split holds the new token writes it (two tiers: written
     * already, by kv_write_token before this launch or by attention_pair_mma's write_token) */
    int mine = !at.n_tok && pos >= 0 && kv_page_index(g, pos) / pages_per_split == split;
    int ko = QD + kvh * HD, vo = QD + KVD + kvh * HD;
    if (mine)
        kv_rotate_head(kv_sm, in + ko, in + vo, bqkv ? bqkv + ko : NULL,
                       bqkv ? bqkv + vo : NULL, cos_sin, pos, HD, style, threadIdx.x,
                       blockDim.x);
    return mine;
}

/* The queries of block (kvh, row r), rotated (attention_rope), with the new token appended
 * before any thread reads: warp 0 stores the key, warp 1 the value. Returns where the gq query
 * rows are: q_sm (gq, HD), or the prompt's q. */
template <int HD>
__device__ __forceinline__ const float *
attention_queries(float *q_sm, float *kv_sm, const float *q, const float *qkv, const float *bqkv,
                  const float2 *cos_sin, int style, uint8_t *pool, const int *table,
                  const KvGeom &g, size_t head_kv, int pos, int r, int kvh, int n_heads, int gq,
                  int pages_per_split, const AttTier &at, int split) {
    if (qkv) {
        int mine = attention_rope<HD>(q_sm, kv_sm, qkv, bqkv, cos_sin, style, g, pos, r, kvh,
                                      n_heads, gq, pages_per_split, at, split);
        __syncthreads();
        if (mine && threadIdx.x < 64)
            kv_append(pool, table, g, head_kv, pos, threadIdx.x / 32,
                      kv_sm + (threadIdx.x / 32) * HD, HD, threadIdx.x % 32);
        __syncthreads();   /* q_sm is complete and the new K, V are in the page */
        return q_sm;
    }
    return q + ((size_t)r * n_heads + kvh * gq) * HD;
}

/* The end of a block: merges what its token groups left in shared memory for query head
 * `head` -- group t's running max sm_m[t], sum sm_l[t] and output sm_acc[t * HD ..] -- into o
 * (total = 0: the block saw the row's every token, nothing to combine) or into partial
 * `split` of `total` for attention_combine. ml, if not NULL, gets the head's max M and sum L. */
template <int HD>
__device__ __forceinline__ void attention_merge(__half *o, float *part, const float *sm_m,
                                                const float *sm_l, const float *sm_acc,
                                                int groups, int r, int head, int n_heads,
                                                int total, int split, float *ml = NULL) {
    for (int c = threadIdx.x; c < HD; c += blockDim.x) {
        float M = -INFINITY, L = 0.0f, A = 0.0f;
        for (int t = 0; t < groups; t++) M = fmaxf(M, sm_m[t]);
        for (int t = 0; t < groups; t++) {
            if (sm_l[t] == 0.0f) continue;   /* a group that saw no token */
            float w = __expf(sm_m[t] - M);
            L += sm_l[t] * w;
            A += sm_acc[t * HD + c] * w;
        }
        if (ml && c == 0) { ml[0] = M; ml[1] = L; }
        if (!total) {
            o[((size_t)r * n_heads + head) * HD + c] = __float2half_rn(L > 0.0f ? A / L : 0.0f);
        } else {
            float *pp = part + (((size_t)r * n_heads + head) * total + split) * (HD + 2);
            pp[c] = A;
            if (c == 0) { pp[HD] = M; pp[HD + 1] = L; }
        }
    }
}

/* One warp merges the splits of one (row, head) from their partials pp (splits, head_dim + 2):
 *   o = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M),  M = max_s m_s
 * 32 splits at a time, lane j holding split j's weight, with the running max rescaling what
 * came before (the online softmax again): every load of a tile is independent, so a long
 * context's many splits cost a few memory latencies, not one per split. Returns (M, L); the
 * output goes to o (head_dim fp16), unless o is NULL: then only M and L are made, with the
 * same arithmetic. Partials are read through L2 (__ldcg): other blocks wrote them. */
__device__ float2 combine_warp(__half *o, const float *pp, int head_dim, int splits) {
    int lane = threadIdx.x % 32, per = head_dim / 32;   /* channels per lane: 2 or 4 */
    float M = -INFINITY, L = 0.0f, A[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int base = 0; base < splits; base += 32) {
        int s = base + lane;
        float ls = s < splits ? __ldcg(pp + (size_t)s * (head_dim + 2) + head_dim + 1) : 0.0f;
        float ms = ls > 0.0f ? __ldcg(pp + (size_t)s * (head_dim + 2) + head_dim) : -INFINITY;
        float Mt = ms;   /* splits past the row's last token have l = 0 and count for nothing */
        for (int k = 16; k > 0; k >>= 1) Mt = fmaxf(Mt, __shfl_xor_sync(0xffffffffu, Mt, k));
        float Mn = fmaxf(M, Mt);
        if (Mn == -INFINITY) continue;   /* nothing seen yet */
        float old = M == -INFINITY ? 0.0f : __expf(M - Mn);
        float ws = ls > 0.0f ? __expf(ms - Mn) : 0.0f, lw = ls * ws;
        for (int k = 16; k > 0; k >>= 1) lw += __shfl_xor_sync(0xffffffffu, lw, k);
        L = L * old + lw;
#pragma unroll
        for (int e = 0; e < 4; e++) A[e] *= old;
        int n = o ? min(32, splits - base) : 0;
#pragma unroll 8
        for (int j = 0; j < n; j++) {
            float wj = __shfl_sync(0xffffffffu, ws, j);
            const float *acc = pp + (size_t)(base + j) * (head_dim + 2);
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (e < per) A[e] += wj * __ldcg(acc + e * 32 + lane);
        }
        M = Mn;
    }
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (o && e < per) o[e * 32 + lane] = __float2half_rn(L > 0.0f ? A[e] / L : 0.0f);
    return make_float2(M, L);
}

/* After a block has written its partials (splits > 1, at.arrive set): the last block of its
 * (row, KV head) to arrive merges the gq heads' first `active` splits (those holding tokens;
 * the blocks of the others wrote nothing) into o, which saves attention_combine's launch -- at
 * batch 1 a decode step is launch-bound. The fence makes this block's partials visible before
 * it counts itself; the counter goes back to 0 for the next launch. */
template <int HD>
__device__ __forceinline__ void attention_finish(__half *o, const float *part, int *arrive,
                                                 int r, int kvh, int gq, int n_heads,
                                                 int splits, int active) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    int *count = arrive + (size_t)r * gridDim.y + kvh;
    if (threadIdx.x == 0) {
        last = atomicAdd(count, 1) == splits - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int h = threadIdx.x / 32; h < gq; h += blockDim.x / 32) {   /* a warp per head */
        int head = kvh * gq + h;
        combine_warp(o + ((size_t)r * n_heads + head) * HD,
                     part + ((size_t)r * n_heads + head) * splits * (HD + 2), HD, active);
    }
}

template <int HD, int GM, int KB, int VB>
__device__ __forceinline__ void
attention_block(__half *o, float *part, const float *q, const float *qkv, const float *bqkv,
                const float2 *cos_sin, int style, uint8_t *pool, const int *table,
                const int *row_slot, const int *row_pos, int layer, const KvGeom &g, int n_heads,
                int gq, int pages_per_split, const AttTier &at, int split, int splits) {
    /* channels per thread: 16 when keys are codes and the registers allow (a wider load, and
     * a thread's per-token work shared by more channels), else 8 */
    constexpr int CH = KB < 16 && GM <= 3 && KB + VB <= 12 ? 16 : 8;
    constexpr int LANES = HD / CH;          /* threads per token */
    constexpr int NT = ATT_THREADS(HD) / LANES;   /* tokens read at once by a block */
    typedef typename CodeVec<KB, CH>::T KT;
    typedef typename CodeVec<VB, CH>::T VT;
    grid_wait();      /* everything below reads what the kernels before wrote */
    grid_release();   /* (attention_mma waits later: it stages its page ids first) */
    int kvh = blockIdx.y, r = blockIdx.z;
    int tok = threadIdx.x / LANES, lane = threadIdx.x % LANES;
    AttRange ar = attention_range(row_slot, row_pos, layer, g, n_heads, gq, pages_per_split,
                                  at, split);
    int pos = ar.pos, n = ar.n, raw_at = ar.raw_at, t_begin = ar.t_begin, t_end = ar.t_end;
    size_t head_kv = ar.head_kv;
    int active = attention_active(g, n, pages_per_split);
    if (at.arrive && t_begin >= t_end) {   /* past the row's tokens (a decode graph spans ctx) */
        attention_finish<HD>(o, part, at.arrive, r, kvh, gq, n_heads, splits, active);
        return;
    }

    __shared__ float q_sm[GM * HD];
    __shared__ float kv_sm[2 * HD];
    const float *qrow = attention_queries<HD>(q_sm, kv_sm, q, qkv, bqkv, cos_sin, style, pool,
                                              table, g, head_kv, pos, r, kvh, n_heads, gq,
                                              pages_per_split, at, split);

    float qr[GM][CH], qsum[GM], m[GM], l[GM], acc[GM][CH], accz[GM];
    const float scale = 1.0f / sqrtf((float)HD);
#pragma unroll
    for (int h = 0; h < GM; h++) {
        qsum[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < CH; j++) {
            qr[h][j] = n > 0 && h < gq ? qrow[h * HD + lane * CH + j] * scale : 0.0f;
            qsum[h] += qr[h][j];
        }
        m[h] = -INFINITY; l[h] = 0.0f; accz[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < CH; j++) acc[h][j] = 0.0f;
    }

    if (t_begin < t_end) {
        const int *tab = table + head_kv * g.width;
        int flip = at.tier == LKV_LOW;   /* the low tier's pages sit at the table's right end */
        int kcb = HD * KB / 8, vcb = HD * VB / 8, szb = g.groups * 4;
        int grp = lane * CH / (HD / g.groups) * 4;  /* this thread's pair inside a token's sz */
        /* tokens per thread per iteration: about the bytes in flight of fp16's 3 tokens */
        constexpr int STEP = KB == 16 ? ATT_STEP : CH == 16 ? (KB + VB <= 6 ? 4 : 2)
                                                   : (GM <= 4 ? 4 : 2);
        KT k[STEP]; VT v[STEP];
        uint32_t ksz[STEP], vsz[STEP];
        auto load = [&](int t0, KT *kk, VT *vv, uint32_t *ks, uint32_t *vs) {
#pragma unroll
            for (int s = 0; s < STEP; s++) {
                int t = t0 + s * NT + tok;
                kk[s] = KT{}; vv[s] = VT{}; ks[s] = 0; vs[s] = 0;
                if (t < t_end) {
                    int pg = kv_page_index(g, t), slot = t - pg * g.tpp;
                    const uint8_t *page = pool + (size_t)tab[flip ? g.width - 1 - pg : pg] * g.page_bytes;
                    kk[s] = *(const KT *)(page + g.k_codes + slot * kcb + lane * (CH * KB / 8));
                    vv[s] = *(const VT *)(page + g.v_codes + slot * vcb + lane * (CH * VB / 8));
                    if constexpr (KB < 16) ks[s] = *(const uint32_t *)(page + g.k_sz + slot * szb + grp);
                    if constexpr (VB < 16) vs[s] = *(const uint32_t *)(page + g.v_sz + slot * szb + grp);
                }
            }
        };
        load(t_begin, k, v, ksz, vsz);
        for (int t0 = t_begin; t0 < t_end; t0 += STEP * NT) {
            KT kn[STEP]; VT vn[STEP];
            uint32_t kszn[STEP], vszn[STEP];
            load(t0 + STEP * NT, kn, vn, kszn, vszn);
            /* scores of this thread's STEP tokens for every query head */
            float s[STEP][GM];
#pragma unroll
            for (int st = 0; st < STEP; st++) {
                float kf[CH];
                unpack<KB, CH>(k[st], kf);
                float2 sz = KB < 16 ? scale_zero(ksz[st]) : make_float2(1.0f, 0.0f);
                bool valid = t0 + st * NT + tok < t_end;
#pragma unroll
                for (int h = 0; h < GM; h++) {
                    float d = 0.0f;
#pragma unroll
                    for (int j = 0; j < CH; j++) d += qr[h][j] * kf[j];
                    if (KB < 16) d = d * sz.x + sz.y * qsum[h];
#pragma unroll
                    for (int off = LANES / 2; off > 0; off >>= 1)
                        d += __shfl_xor_sync(0xffffffffu, d, off);
                    s[st][h] = valid ? d : -INFINITY;
                    if (raw_at >= 0 && valid && lane == 0 && h < gq)
                        at.raw[raw_at + h * at.raw_stride + t0 + st * NT + tok] = d;
                }
            }
            /* online softmax: one rescale of l and acc per STEP tokens */
#pragma unroll
            for (int h = 0; h < GM; h++) {
                float mx = m[h];
#pragma unroll
                for (int st = 0; st < STEP; st++) mx = fmaxf(mx, s[st][h]);
                if (mx == -INFINITY) continue;      /* no token yet */
                float corr = __expf(m[h] - mx);     /* 0 when m was -inf */
                l[h] *= corr; accz[h] *= corr;
#pragma unroll
                for (int j = 0; j < CH; j++) acc[h][j] *= corr;
                m[h] = mx;
            }
#pragma unroll
            for (int st = 0; st < STEP; st++) {
                float vf[CH];
                unpack<VB, CH>(v[st], vf);
                float2 sz = VB < 16 ? scale_zero(vsz[st]) : make_float2(1.0f, 0.0f);
#pragma unroll
                for (int h = 0; h < GM; h++) {
                    float e = s[st][h] == -INFINITY ? 0.0f : __expf(s[st][h] - m[h]);
                    float es = e * sz.x;
                    l[h] += e;
                    if (VB < 16) accz[h] += e * sz.y;
#pragma unroll
                    for (int j = 0; j < CH; j++) acc[h][j] += es * vf[j];
                }
            }
#pragma unroll
            for (int st = 0; st < STEP; st++) {
                k[st] = kn[st]; v[st] = vn[st]; ksz[st] = kszn[st]; vsz[st] = vszn[st];
            }
        }
    }

    /* merge the token groups, one query head at a time: shared [NT] m and l, then [NT][HD]
     * acc (plus the zero terms of quantized values) */
    __shared__ float sm_m[NT], sm_l[NT], sm_acc[NT * HD];
    int total = at.total_splits ? at.total_splits : splits;
    bool direct = total == 1 && !at.raw && !at.n_tok;   /* no partials to combine */
#pragma unroll
    for (int h = 0; h < GM; h++) {
        if (h >= gq) break;                 /* gq is the same for the whole block */
        if (lane == 0) { sm_m[tok] = m[h]; sm_l[tok] = l[h]; }
#pragma unroll
        for (int j = 0; j < CH; j++) sm_acc[tok * HD + lane * CH + j] = acc[h][j] + accz[h];
        __syncthreads();
        attention_merge<HD>(o, part, sm_m, sm_l, sm_acc, NT, r, kvh * gq + h, n_heads,
                            direct ? 0 : total, at.split_base + split);
        __syncthreads();   /* before the next head overwrites the shared arrays */
    }
    if (at.arrive && !direct)
        attention_finish<HD>(o, part, at.arrive, r, kvh, gq, n_heads, total, active);
}

/* ---- Decode attention on tensor cores: the fp16 cache, and code keys with one scale and zero
 * per vector.
 *
 * The same sums as attention_block, arranged as two small matrix products per 16 tokens for
 * one warp, each an mma.sync of a 16x16 by 16x8 fp16 tile into fp32:
 *   S^T (query heads x tokens)  = Q (heads x channels) . C_K^T   then  s_t S + z_t sum(q)
 *   O   (query heads x channels) += (P s) (heads x tokens) . C_V  plus  sum_t p_t z_t
 * where C_K, C_V are the codes themselves: small integers, exact in fp16, so dequantization is
 * a byte permute (and for values, which run through the products as 1024 + 2^j c, a logic op;
 * the 1024 sum(P s) and the 2^j come back out once, at the end), and the scale and zero stay
 * out of the product. A GQA group
 * fills at most 8 of the 16 rows of Q and P; the other 8 carry what fp16 rounding left behind
 * (q = hi + lo, both fp16), so S and O keep fp32's precision at no extra product. The fp16
 * cache runs here too: its keys and values are the operands as they are.
 * Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 g + t holds A rows g and g + 8 at columns
 * 2t, 2t+1, 2t+8, 2t+9; B rows 2t, 2t+1, 2t+8, 2t+9 at column g; C rows g, g+8 at columns 2t,
 * 2t+1. A sum does not care in which order it adds, so each thread reads whole runs of bytes:
 *   keys: lane (g, t) loads channels [t HD/4, (t+1) HD/4) of tokens g and g + 8, and the
 *         channel behind each k index follows from how the codes unpack (mma_codes);
 *   values: lane (g, t) loads channels [g HD/8, (g+1) HD/8) of tokens 2t, 2t+1, 2t+8, 2t+9,
 *         the tokens of its column of P, and its C columns are the matching channels.
 * Measured (bench/RESULTS.md): at batch 64 and 8k tokens, k8v4 in half of fp16's time, where
 * attention_block took three quarters; the block's split has its page ids in shared memory. */

__device__ __forceinline__ void mma_16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* two fp16 (lo in the low half) as one register */
__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}

/* fp16 values: P (at most 1) goes into the products times 2^15 and comes back out at the end,
 * so that small probabilities stay out of fp16's subnormals, where hi + lo would lose their
 * bits (measured, leankv-gpu-bench quant, head dim 64: the decode kernel's worst error 1.28e-3
 * -> 4.2e-4 of the output, the SIMT kernel's; 3.7e-2 -> the output's own fp16 rounding where
 * a row's weight sat on tokens of zero value). Code values carry their scale in P, which
 * bounds nothing: they go as they are. */
#define MMA_P_SCALE 32768.0f

/* two fp16 as one register, a in the low half */
__device__ __forceinline__ uint32_t halves_bits(__half a, __half b) {
    return (uint32_t)__half_as_ushort(a) | (uint32_t)__half_as_ushort(b) << 16;
}

/* x - 1024 on both halves: 0x6400 | c is the fp16 1024 + c, exactly, for c < 1024 */
__device__ __forceinline__ uint32_t minus_1024(uint32_t x) {
    __half2 h = __hsub2(*(__half2 *)&x, __float2half2_rn(1024.0f));
    return *(uint32_t *)&h;
}

/* The BITS-bit codes of one word of a key as fp16 pairs, h[0 .. 16/BITS): pair i holds the
 * elements 2i, 2i+1 of the word, and element e is channel mma_code_channel<BITS>(e) of it. */
template <int BITS>
__device__ __forceinline__ void mma_codes(uint32_t w, uint32_t *h) {
    if constexpr (BITS == 16) { h[0] = w; return; }   /* fp16 keys: a pair of values already */
    constexpr uint32_t MASK = BITS == 8 ? 0xFFFFFFFFu : BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
#pragma unroll
    for (int sub = 0; sub < 8 / BITS; sub++) {   /* one code a byte: bits sub*BITS .. */
        uint32_t m = (w >> (BITS * sub)) & MASK;
        h[2 * sub] = minus_1024(__byte_perm(m, 0x64, 0x4140));       /* bytes 0, 1 */
        h[2 * sub + 1] = minus_1024(__byte_perm(m, 0x64, 0x4342));   /* bytes 2, 3 */
    }
}
template <int BITS>
__host__ __device__ constexpr int mma_code_channel(int e) {   /* byte e % 4, sub-code e / 4 */
    return BITS == 16 ? e : (e % 4) * (8 / BITS) + e / 4;
}

/* The query channel behind element el of lane ti's run of A-fragment elements (quad lane ti
 * owns channels ti HD/4 ..): the key codes' channel order within each word of KB-bit codes,
 * so that q and the unpacked keys meet channel for channel. */
template <int HD, int KB>
__device__ __forceinline__ int mma_q_channel(int ti, int el) {
    constexpr int KPW = 32 / KB;   /* key codes per word */
    return ti * (HD / 4) + el / KPW * KPW + mma_code_channel<KB>(el % KPW);
}

/* A token's weight e (its unnormalised probability) as it enters the P V product: times the
 * value scale sz.x of its codes, or times MMA_P_SCALE for fp16 values, split as hi + lo fp16
 * so that the product keeps fp32's precision. Returns hi + lo, the P s actually fed, whose
 * sum times 1024 mma_output takes back out of the codes' products. */
template <int VB>
__device__ __forceinline__ float mma_p_split(float e, float2 sz, __half *hi, __half *lo) {
    float es = e * (VB < 16 ? sz.x : MMA_P_SCALE);
    *hi = __float2half_rn(es);
    *lo = __float2half_rn(es - __half2float(*hi));
    return __half2float(*hi) + __half2float(*lo);
}

/* Output channel x of tile j, summed over the products, in the values' own units: codes ran
 * as 1024 + 2^(VB sub) c with sub-code j % (8 / VB) (mma_code_pairs), so the 1024 of each
 * P s fed (acs, their sum) comes off and the power of two divides out, and the zero terms
 * (accz) come on; fp16 values ran times MMA_P_SCALE. */
template <int VB>
__device__ __forceinline__ float mma_output(float x, float acs, float accz, int j) {
    if constexpr (VB < 16) return (x - 1024.0f * acs) * (1.0f / (float)(1 << (VB * (j % (8 / VB))))) + accz;
    else return x * (1.0f / MMA_P_SCALE);
}

/* The BITS-bit codes at byte b of two tokens' value words wa, wb as fp16 pairs (token a low,
 * token b high), one pair per channel of the byte in channel order: h[0 .. 8/BITS). Each is
 * left as 1024 + 2^(BITS sub) c -- the code where it sits in its byte, under 1024's exponent,
 * one logic op -- and attention_mma takes the 1024 and the power of two back out at the end. */
template <int BITS>
__device__ __forceinline__ void mma_code_pairs(uint32_t wa, uint32_t wb, int b, uint32_t *h) {
    constexpr uint32_t MASK = ((1u << BITS) - 1) * 0x00010001u;
    uint32_t u = __byte_perm(wa, wb, b | ((b + 4) << 8));   /* a's byte b, then b's at bit 16 */
#pragma unroll
    for (int sub = 0; sub < 8 / BITS; sub++) h[sub] = (u & (MASK << (BITS * sub))) | 0x64006400u;
}

/* n bytes from p into words (n = 2, 4, 8, 16 or 32), with the widest loads their alignment allows */
template <int N>
__device__ __forceinline__ void load_words(const uint8_t *p, uint32_t *w) {
    if constexpr (N == 2) w[0] = *(const uint16_t *)p;
    else if constexpr (N == 4) w[0] = *(const uint32_t *)p;
    else if constexpr (N == 8) { uint2 x = *(const uint2 *)p; w[0] = x.x; w[1] = x.y; }
    else {
#pragma unroll
        for (int i = 0; i < N / 16; i++) {
            uint4 x = ((const uint4 *)p)[i];
            w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
        }
    }
}

/* One chunk's loads for a lane (lane = 4 g + t): the keys of tokens g and g + 8, the values
 * with their scales and zeros of tokens 2t, 2t+1, 2t+8, 2t+9 -- the B operands of the two
 * products, in the order mma_pass and attention_prefill_mma consume them. */
template <int HD, int KB, int VB> struct MmaChunk {
    static constexpr int KBYTES = HD * KB / 32, VBYTES = HD * VB / 64;   /* a lane's bytes of a token */
    static constexpr int KW = (KBYTES + 3) / 4, VW = (VBYTES + 3) / 4;   /* ... in words */
    uint32_t k[2][KW], v[4][VW], ksz[4], vsz[4];
};

/* the chunk's token behind a lane's load i: keys k[0], k[1] (i = 0, 1), then values v[u]
 * with their scales and zeros (i = 2 + u) */
__device__ __forceinline__ int mma_token(int i, int gi, int ti) {
    return i < 2 ? 8 * i + gi : 2 * ti + ((i - 2) & 1) + ((i - 2) >> 1) * 8;
}

/* 16 slots of one page from slot0, every address one of four per-lane bases plus a constant
 * (fewer instructions: the decode kernel issues an instruction every other cycle); the value
 * scales and zeros of the slots at nvalid and after read as 0 (a PAGED chunk's tail) */
template <int HD, int KB, int VB>
__device__ __forceinline__ void mma_load_page(MmaChunk<HD, KB, VB> &ck, const uint8_t *page,
                                              const KvGeom &g, int slot0, int nvalid, int gi,
                                              int ti) {
    constexpr int KBYTES = MmaChunk<HD, KB, VB>::KBYTES, VBYTES = MmaChunk<HD, KB, VB>::VBYTES;
    const uint8_t *kb = page + g.k_codes + (slot0 + gi) * (HD * KB / 8) + ti * KBYTES;
    const uint8_t *vb = page + g.v_codes + (slot0 + 2 * ti) * (HD * VB / 8) + gi * VBYTES;
#pragma unroll
    for (int i = 0; i < 2; i++) load_words<KBYTES>(kb + 8 * i * (HD * KB / 8), ck.k[i]);
#pragma unroll
    for (int u = 0; u < 4; u++) {
        int du = (u & 1) + (u >> 1) * 8;   /* token 2t + du: mma_token(2 + u) */
        load_words<VBYTES>(vb + du * (HD * VB / 8), ck.v[u]);
        if constexpr (KB < 16) ck.ksz[u] = *(const uint32_t *)(page + g.k_sz + (slot0 + 2 * ti + du) * 4);
        if constexpr (VB < 16) {
            uint32_t vsz = *(const uint32_t *)(page + g.v_sz + (slot0 + 2 * ti + du) * 4);
            ck.vsz[u] = 2 * ti + du < nvalid ? vsz : 0u;
        }
    }
}

/* The chunk of 16 tokens from c0 (pages: the page ids from page p0 on); tokens at lim and
 * after load as zeros. A chunk inside one page (pages of a multiple of 16 tokens) loads as one
 * page; else each token finds its own. */
template <int HD, int KB, int VB>
__device__ __forceinline__ void mma_load(MmaChunk<HD, KB, VB> &ck, const uint8_t *pool,
                                         const KvGeom &g, const int *pages, int p0, int c0,
                                         int lim, int gi, int ti) {
    constexpr int KBYTES = MmaChunk<HD, KB, VB>::KBYTES, VBYTES = MmaChunk<HD, KB, VB>::VBYTES;
    constexpr int KW = MmaChunk<HD, KB, VB>::KW, VW = MmaChunk<HD, KB, VB>::VW;
    int whole = g.tpp % 16 == 0;   /* every chunk lies inside one page (splits start at pages) */
    if (whole && c0 + 16 <= lim) {   /* the common case, a full chunk in one page */
        int pg = kv_page_index(g, c0);
        mma_load_page<HD, KB, VB>(ck, pool + (size_t)pages[pg - p0] * g.page_bytes,
                                  g, c0 - pg * g.tpp, 16, gi, ti);
        return;
    }
    const uint8_t *chunk_page = pool;
    int chunk_slot = 0;
    if (whole) {
        int pg = kv_page_index(g, c0);
        chunk_page += (size_t)pages[pg - p0] * g.page_bytes;
        chunk_slot = c0 - pg * g.tpp;
    }
#pragma unroll
    for (int i = 0; i < 6; i++) {
        int dt = mma_token(i, gi, ti), t = c0 + dt, ok = t < lim, slot;
        const uint8_t *page;
        if (whole) { page = chunk_page; slot = chunk_slot + dt; }
        else {
            int pg = ok ? kv_page_index(g, t) : p0;
            slot = t - pg * g.tpp;
            page = pool + (size_t)(ok ? pages[pg - p0] : 0) * g.page_bytes;
        }
        if (i < 2) {
            if (ok) load_words<KBYTES>(page + g.k_codes + slot * (HD * KB / 8) + ti * KBYTES, ck.k[i]);
            else
#pragma unroll
                for (int w = 0; w < KW; w++) ck.k[i][w] = 0;
        } else {
            int u = i - 2;
            if (ok) {
                load_words<VBYTES>(page + g.v_codes + slot * (HD * VB / 8) + gi * VBYTES, ck.v[u]);
                if constexpr (KB < 16) ck.ksz[u] = *(const uint32_t *)(page + g.k_sz + slot * 4);
                if constexpr (VB < 16) ck.vsz[u] = *(const uint32_t *)(page + g.v_sz + slot * 4);
            } else {
#pragma unroll
                for (int w = 0; w < VW; w++) ck.v[u][w] = 0;
                ck.ksz[u] = ck.vsz[u] = 0;
            }
        }
    }
}

/* O += (P s) C_V for one chunk (ck's values), one 8-channel tile at a time: tile j is channel
 * g HD/8 + j of lane g. p: NP A fragments of P -- the decode kernel's one (hi rows g, lo rows
 * g + 8), the prompt kernel's hi and lo, whose rows are all real. */
template <int HD, int KB, int VB, int NP>
__device__ __forceinline__ void mma_values(float (*acc)[4], const MmaChunk<HD, KB, VB> &ck,
                                           const uint32_t (*p)[4]) {
    constexpr int NTILES = HD / 8, VBYTES = MmaChunk<HD, KB, VB>::VBYTES;
    if constexpr (VB == 16) {   /* fp16 values: the halves of two tokens' words, paired */
#pragma unroll
        for (int j = 0; j < NTILES; j++) {
            uint32_t sel = j % 2 ? 0x7632u : 0x5410u;
#pragma unroll
            for (int i = 0; i < NP; i++)
                mma_16816(acc[j], p[i], __byte_perm(ck.v[0][j / 2], ck.v[1][j / 2], sel),
                          __byte_perm(ck.v[2][j / 2], ck.v[3][j / 2], sel));
        }
    } else {
#pragma unroll
        for (int b = 0; b < VBYTES; b++) {
            uint32_t v01[8 / VB], v89[8 / VB];
            mma_code_pairs<VB>(ck.v[0][b / 4], ck.v[1][b / 4], b % 4, v01);
            mma_code_pairs<VB>(ck.v[2][b / 4], ck.v[3][b / 4], b % 4, v89);
#pragma unroll
            for (int sub = 0; sub < 8 / VB; sub++)
#pragma unroll
                for (int i = 0; i < NP; i++)
                    mma_16816(acc[b * (8 / VB) + sub], p[i], v01[sub], v89[sub]);
        }
    }
}

/* What a lane holds after a pass over tokens (mma_pass), for query head g of its quad (lane
 * = 4 g + t): the running max m and sum l of the head's softmax and its unnormalised output
 * in channels (2t + e) HD/8 + j, x[2 j + e]. Heads g >= gq hold nothing that counts. */
template <int HD> struct MmaLane { float m, l, x[HD / 4]; };

/* One pass of a block's warps over tokens [t_begin, t_end) of one tier (att_pages: the page ids
 * of its split, from page p0 on), on tensor cores, into res. qrow: the gq query rows; n = 0: a
 * padding row. mine: this block writes the new token at pos (one tier), whose K and V are in
 * kv_sm. PAGED: chunks follow pages (below). */
template <int HD, int KB, int VB, int S, bool PAGED>
__device__ __forceinline__ void
mma_pass(MmaLane<HD> &res, const float *qrow, int n, int gq, uint8_t *pool, const int *table,
         const KvGeom &g, size_t head_kv, const int *att_pages, int p0, int t_begin, int t_end,
         int raw_at, const AttTier &at, int mine, int pos, const float *kv_sm) {
    constexpr int WARPS = ATT_THREADS(HD) / 32;
    constexpr int KBYTES = HD * KB / 32, VBYTES = HD * VB / 64;   /* a lane's bytes of a token */
    constexpr int KW = (KBYTES + 3) / 4;                          /* ... in words */
    constexpr int KSTEPS = HD / 16, NTILES = HD / 8;              /* mma k steps; output tiles */
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;

    typedef MmaChunk<HD, KB, VB> Chunk;
    /* PAGED (two tiers, a tier whose pages hold a number of tokens that is not a multiple of 16,
     * such as k4v2's 28): chunks follow the pages, ceil(tpp / 16) a page, the last one of a page
     * partly empty (16 + 12 for 28), so that every chunk loads from one page like a full one.
     * Its slots past the page's tokens read whatever the next segment of the same page holds
     * (gpu_build checks they stay inside it): their keys are masked out of the softmax and
     * their value scales and zeros set to 0, so they add nothing (value codes are small
     * integers, never NaN). Chunk k of the split starts at token chunk_begin(k); its tokens
     * below chunk_lim(k) are real. */
    const int cpp = (g.tpp + 15) / 16;   /* PAGED: chunks a page */
    auto chunk_begin = [&](int k) -> int {
        if constexpr (PAGED) {
            int kp = k / cpp;
            return t_begin + kp * g.tpp + 16 * (k - kp * cpp);
        } else return t_begin + 16 * k;
    };
    auto chunk_lim = [&](int k) -> int {
        if constexpr (PAGED) return min(t_end, t_begin + (k / cpp + 1) * g.tpp);
        else return t_end;
    };
    static_assert(!PAGED || (KB < 16 && VB < 16), "PAGED chunks are for code keys and values");
    auto load_paged = [&](int k, Chunk &ck) {
        int kp = k / cpp, slot0 = 16 * (k - kp * cpp);
        int c0 = t_begin + kp * g.tpp + slot0, lim = min(t_end, t_begin + (kp + 1) * g.tpp);
        mma_load_page<HD, KB, VB>(ck, pool + (size_t)att_pages[kp] * g.page_bytes, g, slot0,
                                  lim - c0, gi, ti);
    };
    auto fetch = [&](int k, Chunk &ck, int lim) {
        if constexpr (PAGED) load_paged(k, ck);
        else mma_load<HD, KB, VB>(ck, pool, g, att_pages, p0, chunk_begin(k), lim, gi, ti);
    };

    /* The first S - 1 chunks' loads go out before anything else, so that the new token's
     * quantization (mine) and the query fragments below overlap their latency. The new token's
     * slot is not written yet: those loads leave it out (lim), and the lanes that hold it take
     * its bytes from the shared-memory image that kv_append_image quantized them into. */
    Chunk cb[S];
    int k0 = warp;   /* warp w takes chunks w, w + WARPS, ... */
#pragma unroll
    for (int i = 0; i < S - 1; i++)
        if (chunk_begin(k0 + i * WARPS) < t_end) fetch(k0 + i * WARPS, cb[i], mine ? pos : t_end);
    if (!PAGED && mine) {   /* (one tier only, so never PAGED) */
        constexpr int KCW = HD * KB / 32, VCW = HD * VB / 32;   /* code words of K, V */
        /* key codes, value codes (each a multiple of 16 bytes), key sz, value sz */
        __shared__ __align__(16) uint32_t img[KCW + VCW + 2];
        if (warp == 0)   /* warp 0 the key, warp 1 the value */
            kv_append_image<HD, KB>(img, img + KCW + VCW, pool, table, g, head_kv, pos, 0, kv_sm,
                                    lane);
        else if (warp == 1)
            kv_append_image<HD, VB>(img + KCW, img + KCW + VCW + 1, pool, table, g, head_kv, pos,
                                    1, kv_sm + HD, lane);
        __syncthreads();
        const uint8_t *kimg = (const uint8_t *)img, *vimg = (const uint8_t *)(img + KCW);
#pragma unroll
        for (int i = 0; i < S - 1; i++) {
            int dt = pos - chunk_begin(k0 + i * WARPS);   /* the new token's place in chunk i, if there */
            if (dt < 0 || dt >= 16) continue;
#pragma unroll
            for (int e = 0; e < 2; e++)
                if (dt == mma_token(e, gi, ti)) load_words<KBYTES>(kimg + ti * KBYTES, cb[i].k[e]);
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (dt == mma_token(2 + u, gi, ti)) {
                    load_words<VBYTES>(vimg + gi * VBYTES, cb[i].v[u]);
                    if constexpr (KB < 16) cb[i].ksz[u] = img[KCW + VCW];
                    if constexpr (VB < 16) cb[i].vsz[u] = img[KCW + VCW + 1];
                }
        }
    }

    /* Q as A fragments, in the key codes' channel order: rows g (hi) and g + 8 (lo) of head g */
    uint32_t qa[KSTEPS][4];
    float qsum = 0.0f;   /* sum over channels of head g's scaled query */
    const float scale = 1.0f / sqrtf((float)HD);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
        float x[4], lo[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {   /* elements 4 ks + e of this lane's run of channels */
            int ch = mma_q_channel<HD, KB>(ti, 4 * ks + e);
            x[e] = n > 0 && gi < gq ? qrow[gi * HD + ch] * scale : 0.0f;
            qsum += x[e];
            lo[e] = x[e] - __half2float(__float2half_rn(x[e]));
        }
        qa[ks][0] = half2_bits(x[0], x[1]);  qa[ks][1] = half2_bits(lo[0], lo[1]);
        qa[ks][2] = half2_bits(x[2], x[3]);  qa[ks][3] = half2_bits(lo[2], lo[3]);
    }
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);

    float acc[NTILES][4], m = -INFINITY, l = 0.0f, accz = 0.0f;
#pragma unroll
    for (int j = 0; j < NTILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    /* the sums of one chunk of 16 tokens from c0 into m, l, acc, accz and acs (tokens at lim
     * and after: none) */
    float acs = 0.0f;   /* sum of the P s fed to the products: each carries 1024 x it */
    auto chunk = [&](const Chunk &ck, int c0, int lim) {
        /* S^T: tile i holds tokens 8i .. 8i+7 of the chunk */
        float s4[2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            s4[i][0] = s4[i][1] = s4[i][2] = s4[i][3] = 0.0f;
            uint32_t kh[HD / 8];
#pragma unroll
            for (int w = 0; w < KW; w++) mma_codes<KB>(ck.k[i][w], kh + w * (16 / KB));
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ks++) mma_16816(s4[i], qa[ks], kh[2 * ks], kh[2 * ks + 1]);
        }
        /* this lane's scores of head g: tokens 2t, 2t+1, 2t+8, 2t+9 (u = 0 .. 3) */
        float sc[4], mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int t = c0 + 2 * ti + (u & 1) + (u >> 1) * 8;
            float d = s4[u >> 1][u & 1] + s4[u >> 1][2 + (u & 1)];
            if constexpr (KB < 16) {
                float2 sz = scale_zero(ck.ksz[u]);
                d = d * sz.x + sz.y * qsum;
            }
            sc[u] = t < lim ? d : -INFINITY;
            if (raw_at >= 0 && t < lim && gi < gq) at.raw[raw_at + gi * at.raw_stride + t] = d;
            mx = fmaxf(mx, sc[u]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mnew = fmaxf(m, mx);   /* finite: the chunk's first token is valid */
        if (__any_sync(0xffffffffu, mnew != m)) {   /* online softmax: rescale what came before */
            float corr = __expf(m - mnew);
            l *= corr; accz *= corr; acs *= corr;
#pragma unroll
            for (int j = 0; j < NTILES; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[j][e] *= corr;
            m = mnew;
        }
        /* P s as A fragments (hi rows g, lo rows g + 8); the zero terms on the side */
        __half hi[4], lo[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float e = __expf(sc[u] - m);   /* 0 for a token past the end */
            float2 sz = VB < 16 ? scale_zero(ck.vsz[u]) : make_float2(1.0f, 0.0f);
            l += e;
            accz += e * sz.y;
            acs += mma_p_split<VB>(e, sz, &hi[u], &lo[u]);
        }
        uint32_t pa[1][4] = {{halves_bits(hi[0], hi[1]), halves_bits(lo[0], lo[1]),
                              halves_bits(hi[2], hi[3]), halves_bits(lo[2], lo[3])}};
        mma_values<HD, KB, VB, 1>(acc, ck, pa);
    };
    /* The next S - 1 chunks' loads are in flight while one is summed (the first loads went out
     * above); the buffers move along after each chunk. One copy of chunk() in the loop, not S:
     * the copies cost some register moves, but the unrolled loop was too big for the
     * instruction cache (ncu: a quarter of the loop's stall samples waited for instructions).
     * Measured (H100, SmolLM2, 96 sequences, decode tok/s): leankv 42.8k -> 45.7k, k8v4 56.7k
     * -> 60.5k. */
    for (int k = k0; chunk_begin(k) < t_end; k += WARPS) {
        int kn = k + (S - 1) * WARPS;
        if (chunk_begin(kn) < t_end) fetch(kn, cb[S - 1], t_end);
        chunk(cb[0], chunk_begin(k), chunk_lim(k));
#pragma unroll
        for (int i = 0; i < S - 1; i++) cb[i] = cb[i + 1];
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    accz += __shfl_xor_sync(0xffffffffu, accz, 1);
    accz += __shfl_xor_sync(0xffffffffu, accz, 2);
    acs += __shfl_xor_sync(0xffffffffu, acs, 1);
    acs += __shfl_xor_sync(0xffffffffu, acs, 2);

    /* the lane's channels, in the values' own units: codes ran as 1024 + 2^(VB sub) c */
    res.m = m;
    res.l = l;
#pragma unroll
    for (int j = 0; j < NTILES; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {   /* column 2t + e: channel (2t + e) HD/8 + j */
            /* rows g (hi) and g + 8 (lo) */
            res.x[2 * j + e] = mma_output<VB>(acc[j][e] + acc[j][2 + e], acs, accz, j);
        }
}

/* The end of a block on tensor cores: the warps' results (res), one query head at a time, into
 * o (total = 0: the block saw all the row's tokens) or into partial `split` of `total`
 * (attention_merge); ml, if not NULL, gets each head's (M, L), (gq, 2). */
template <int HD>
__device__ __forceinline__ void mma_merge(const MmaLane<HD> &res, __half *o, float *part, int gq,
                                          int r, int kvh, int n_heads, int total, int split,
                                          float *ml = NULL) {
    constexpr int WARPS = ATT_THREADS(HD) / 32;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    __shared__ float sm_m[WARPS], sm_l[WARPS], sm_acc[WARPS * HD];
    for (int h = 0; h < gq; h++) {
        if (gi == h) {
            if (ti == 0) { sm_m[warp] = res.m; sm_l[warp] = res.l; }
#pragma unroll
            for (int j = 0; j < HD / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                    sm_acc[warp * HD + (2 * ti + e) * (HD / 8) + j] = res.x[2 * j + e];
        }
        __syncthreads();
        attention_merge<HD>(o, part, sm_m, sm_l, sm_acc, WARPS, r, kvh * gq + h, n_heads, total,
                            split, ml ? ml + 2 * h : NULL);
        __syncthreads();
    }
}

/* An empty partial, l = 0, for each of the gq query heads of (row r, KV head kvh) at partial
 * base + split of `total`: a block past its tokens, which the merge then counts for nothing */
template <int HD>
__device__ __forceinline__ void empty_partial(float *part, int r, int kvh, int gq, int n_heads,
                                              int total, int base, int split) {
    for (int h = threadIdx.x; h < gq; h += blockDim.x)
        part[(((size_t)r * n_heads + kvh * gq + h) * total + base + split) * (HD + 2) + HD + 1] = 0.0f;
}

template <int HD, int KB, int VB, int S>
__device__ __forceinline__ void
attention_mma(__half *o, float *part, const float *q, const float *qkv, const float *bqkv,
              const float2 *cos_sin, int style, uint8_t *pool, const int *table,
              const int *row_slot, const int *row_pos, int layer, const KvGeom &g, int n_heads,
              int gq, int pages_per_split, const AttTier &at, int split, int splits) {
    int kvh = blockIdx.y, r = blockIdx.z;
    /* The split's page ids, staged in shared memory: a token's address then costs one global
     * load (its data), not two (the table, then the data). One tier: rows, positions and
     * tables were set before the kernel before this one ran, so this overlaps it (launch_pdl);
     * two tiers: the per-head counts come from kv_write_token, just before. */
    if (at.n_tok) { grid_wait(); grid_release(); }
    AttRange ar = attention_range(row_slot, row_pos, layer, g, n_heads, gq, pages_per_split,
                                  at, split);
    int pos = ar.pos, n = ar.n, raw_at = ar.raw_at, t_begin = ar.t_begin, t_end = ar.t_end;
    size_t head_kv = ar.head_kv;
    extern __shared__ int att_pages[];   /* (pages_per_split) */
    const int *tab = table + head_kv * g.width;
    int flip = at.tier == LKV_LOW, p0 = split * pages_per_split;
    int np = t_begin < t_end ? kv_page_index(g, t_end - 1) - p0 + 1 : 0;
    for (int i = threadIdx.x; i < np; i += blockDim.x)
        att_pages[i] = tab[flip ? g.width - 1 - (p0 + i) : p0 + i];
    if (!at.n_tok) { grid_wait(); grid_release(); }
    int active = attention_active(g, n, pages_per_split);
    if (at.arrive && t_begin >= t_end) {   /* past the row's tokens (a decode graph spans ctx) */
        attention_finish<HD>(o, part, at.arrive, r, kvh, gq, n_heads, splits, active);
        return;
    }
    if (at.n_tok && t_begin >= t_end) {    /* past the tier's tokens */
        empty_partial<HD>(part, r, kvh, gq, n_heads, at.total_splits, at.split_base, split);
        return;
    }
    __shared__ float q_sm[8 * HD];
    __shared__ float kv_sm[2 * HD];
    int mine = qkv ? attention_rope<HD>(q_sm, kv_sm, qkv, bqkv, cos_sin, style, g, pos, r, kvh,
                                        n_heads, gq, pages_per_split, at, split)
                   : 0;
    const float *qrow = qkv ? q_sm : q + ((size_t)r * n_heads + kvh * gq) * HD;
    __syncthreads();   /* att_pages and q_sm are complete, kv_sm holds the new K and V */

    MmaLane<HD> res;
    mma_pass<HD, KB, VB, S, false>(res, qrow, n, gq, pool, table, g, head_kv, att_pages, p0,
                                   t_begin, t_end, raw_at, at, mine, pos, kv_sm);
    int total = at.total_splits ? at.total_splits : splits;
    bool direct = total == 1 && !at.raw && !at.n_tok;
    mma_merge<HD>(res, o, part, gq, r, kvh, n_heads, direct ? 0 : total, at.split_base + split);
    if (at.arrive && !direct)
        attention_finish<HD>(o, part, at.arrive, r, kvh, gq, n_heads, total, active);
}

/* A token's significance gain from a decode step (section 3): the max over the GQA group of
 * its probability exp(s - M) / L, from raw[h * stride], its score for query head h, and that
 * head's max M and sum L in ml[2 h], ml[2 h + 1]. tier_scores and kv_score_decode add it. */
__device__ __forceinline__ float step_gain(const float *raw, size_t stride, const float *ml,
                                           int gq) {
    float mx = 0.0f;
    for (int h = 0; h < gq; h++) mx = fmaxf(mx, __expf(raw[h * stride] - ml[2 * h]) / ml[2 * h + 1]);
    return mx;
}

/* Token i of one tier of a head (pages: the tier's page ids from the block's first page on):
 * its score in the page */
__device__ __forceinline__ float *tier_score(uint8_t *pool, const KvGeom &g, const int *pages,
                                             int i) {
    int pg = kv_page_index(g, i);
    return (float *)(pool + (size_t)pages[pg] * g.page_bytes + g.scores) + (i - pg * g.tpp);
}

/* Copies the scores of a tier's n tokens into old[0, n) in shared memory, asynchronously
 * (cp.async; cp_async_wait_all before reading): thread j takes tokens j, j + blockDim.x, ...,
 * the tokens it adds to in tier_scores, so it reads back only its own copies. */
__device__ __forceinline__ void fetch_scores(float *old, uint8_t *pool, const KvGeom &g,
                                             const int *pages, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        unsigned dst = (unsigned)__cvta_generic_to_shared(old + i);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst),
                     "l"(tier_score(pool, g, pages, i)));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/* Significance (section 3) of the n tokens of one tier of a head, all in the block's one
 * split (pages: their page ids), from the scores this block kept in raw, (gq, stride), and each
 * query head's max M and sum L in ml: every token gains max over the group of exp(s - M) / L,
 * step_gain, as kv_score_decode adds it. old: the tokens' scores, fetched into shared memory
 * while attention ran (fetch_scores), or NULL: read from the pages here, four tokens a thread
 * at a time, their loads together. Measured (H100, SmolLM2, 96 sequences of 1-1.3k tokens,
 * decode tok/s): 39.6k with the old scores read here and raw in global memory, 42.0k with raw
 * alone in shared memory, 42.9k with both (49.2k with no significance at all, an upper bound
 * only: without the gains the tier cases change too). */
__device__ __forceinline__ void tier_scores(uint8_t *pool, const KvGeom &g, const int *pages, int n,
                                            const float *raw, int stride, int gq,
                                            const float *ml, const float *old) {
    constexpr int U = 4;
    for (int i0 = threadIdx.x; i0 < n; i0 += U * blockDim.x) {
        float mx[U], *sp[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = i0 + u * blockDim.x;
            mx[u] = 0.0f;
            sp[u] = NULL;
            if (i >= n) continue;
            mx[u] = step_gain(raw + i, stride, ml, gq);
            sp[u] = tier_score(pool, g, pages, i);
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            if (sp[u]) *sp[u] = (old ? old[i0 + u * blockDim.x] : *sp[u]) + mx[u];
    }
}

/* Both tiers of a (row, KV head) in one block (leankv's default pair on tensor cores): split
 * i of the high tier, then split i of the low tier, each a pass at its own precision over its
 * own pages (the low tier's 28-token pages PAGED), merged in registers -- the online softmax
 * once more -- into one partial of max(splits) per row and head. Half the blocks of a block
 * per tier: their fixed work (queries, page ids, the merge) done once, and one wave of blocks
 * where two tiers made one and a half. Between the passes each thread keeps the high tier's
 * result in shared memory (registers are spoken for: 3 blocks an SM). Dynamic shared memory:
 * (2, pages_per_split) page ids, then the stash (HD / 4 + 2, threads) floats (tiers_smem). */
template <int HD, int KB0, int VB0, int KB1, int VB1>
__device__ __forceinline__ void
attention_pair_mma(__half *o, float *part, const float *qkv, const float *bqkv,
                   const float2 *cos_sin, int style, uint8_t *pool, const int *table,
                   const int *row_slot, const int *row_pos, int layer, const KvGeom &g0,
                   const KvGeom &g1, int n_heads, int gq, int pages_per_split, const AttTier &a0,
                   const AttTier &a1, int *n_tok, int *plan) {
    constexpr int NX = HD / 4;
    int kvh = blockIdx.y, r = blockIdx.z, split = blockIdx.x, total = a0.total_splits;
    int own = plan != NULL;   /* one split, and the block does the head's step (one_block_heads) */
    grid_wait();   /* else the tiers' counts come from kv_write_token, just before */
    grid_release();
    if (own && row_pos[r] >= 0) {
        /* One split: this block alone reads the head this step, so it writes the new token
         * itself (kv_write_token's work, without its launch), before it reads the counts */
        write_token<HD, KB0, VB0, KB1, VB1>(pool, table, g0, g1, n_tok, plan, qkv, bqkv, cos_sin,
                                            style, kv_head(g0, row_slot[r], layer, kvh), r, kvh,
                                            row_pos[r], n_heads, HD);
        __syncthreads();   /* the block's writes (pages, counts) are visible to all of it */
    }
    AttRange h0 = attention_range(row_slot, row_pos, layer, g0, n_heads, gq, pages_per_split,
                                  a0, split);
    AttRange h1 = attention_range(row_slot, row_pos, layer, g1, n_heads, gq, pages_per_split,
                                  a1, split);
    extern __shared__ int att_pages[];
    int *pages0 = att_pages, *pages1 = att_pages + pages_per_split, p0 = split * pages_per_split;
    const int *tab = table + h0.head_kv * g0.width;
    int np0 = h0.t_begin < h0.t_end ? kv_page_index(g0, h0.t_end - 1) - p0 + 1 : 0;
    int np1 = h1.t_begin < h1.t_end ? kv_page_index(g1, h1.t_end - 1) - p0 + 1 : 0;
    for (int i = threadIdx.x; i < np0; i += blockDim.x) pages0[i] = tab[p0 + i];
    for (int i = threadIdx.x; i < np1; i += blockDim.x) pages1[i] = tab[g1.width - 1 - (p0 + i)];
    if (np0 == 0 && np1 == 0) {   /* a padding row, or past both tiers' tokens */
        empty_partial<HD>(part, r, kvh, gq, n_heads, total, 0, split);
        return;
    }
    __shared__ float q_sm[8 * HD];
    attention_rope<HD>(q_sm, NULL, qkv, bqkv, cos_sin, style, g0, h0.pos, r, kvh, n_heads, gq,
                       pages_per_split, a0, split);   /* (two tiers: never the new token) */
    __syncthreads();   /* the page ids and q_sm are complete */
    /* A block that owns its head may keep the scores in shared memory, after the stash: the
     * tokens' old scores, fetched while attention runs, then raw's (gq, ctx); token i of the
     * low tier is token h0.t_end + i of both, as in raw (attention_range). */
    float *old = NULL;
    AttTier b0 = a0, b1 = a1;
    if (own && a0.scores_sm) {
        old = (float *)(att_pages + 2 * pages_per_split) + (NX + 2) * blockDim.x;
        b0.raw = b1.raw = old + a0.raw_stride;
        h0.raw_at = 0; h1.raw_at = h0.t_end;
        fetch_scores(old, pool, g0, pages0, h0.t_end);
        fetch_scores(old + h0.t_end, pool, g1, pages1, h1.t_end);
        cp_async_commit();
    }
    MmaLane<HD> res;
    res.m = -INFINITY; res.l = 0.0f;
#pragma unroll
    for (int k = 0; k < NX; k++) res.x[k] = 0.0f;
    if (np0)
        mma_pass<HD, KB0, VB0, 2, false>(res, q_sm, 1, gq, pool, table, g0, h0.head_kv, pages0, p0,
                                         h0.t_begin, h0.t_end, h0.raw_at, b0, 0, h0.pos, NULL);
    if (np1) {
        float *stash = (float *)(att_pages + 2 * pages_per_split) + threadIdx.x;   /* stride: threads */
        if (np0) {
            stash[0] = res.m; stash[blockDim.x] = res.l;
#pragma unroll
            for (int k = 0; k < NX; k++) stash[(2 + k) * blockDim.x] = res.x[k];
        }
        if (g1.tpp % 16)
            mma_pass<HD, KB1, VB1, 2, true>(res, q_sm, 1, gq, pool, table, g1, h1.head_kv, pages1,
                                            p0, h1.t_begin, h1.t_end, h1.raw_at, b1, 0, h1.pos, NULL);
        else
            mma_pass<HD, KB1, VB1, 2, false>(res, q_sm, 1, gq, pool, table, g1, h1.head_kv, pages1,
                                             p0, h1.t_begin, h1.t_end, h1.raw_at, b1, 0, h1.pos, NULL);
        if (np0) {   /* the two passes' (m, l, x), each relative to its own max */
            float mh = stash[0], lh = stash[blockDim.x], M = fmaxf(mh, res.m);
            float wh = lh > 0.0f ? __expf(mh - M) : 0.0f, wl = res.l > 0.0f ? __expf(res.m - M) : 0.0f;
            res.m = M;
            res.l = lh * wh + res.l * wl;
#pragma unroll
            for (int k = 0; k < NX; k++) res.x[k] = stash[(2 + k) * blockDim.x] * wh + res.x[k] * wl;
        }
    }
    if (!own) {   /* kv_score_decode merges the splits and adds the scores */
        mma_merge<HD>(res, o, part, gq, r, kvh, n_heads, total, split);
        return;
    }
    /* One split: this block saw every token of the row's head, so M and L are final, o goes
     * out directly, and the step's significance goes into the pages here (kv_score_decode's
     * work, without its launch or its page-table loads). */
    __shared__ float sm_ml[16];   /* (gq, 2) */
    mma_merge<HD>(res, o, part, gq, r, kvh, n_heads, 0, 0, sm_ml);   /* (ends in a sync) */
    if (old) cp_async_wait_all();   /* this thread's own copies (fetch_scores) */
    tier_scores(pool, g0, pages0, h0.t_end, b0.raw + h0.raw_at, a0.raw_stride, gq, sm_ml, old);
    tier_scores(pool, g1, pages1, h1.t_end, b1.raw + h1.raw_at, a1.raw_stride, gq, sm_ml,
                old ? old + h0.t_end : NULL);
}

/* TC: on tensor cores (attention_mma; code keys, one scale/zero pair per vector, gq <= 8), with
 * S - 1 chunks in flight per warp */
template <int HD, int GM, int KB, int VB, bool TC, int S = 2>
__global__ void __launch_bounds__(ATT_THREADS(HD), HD == 64 && GM <= 4 ? ATT_BLOCKS_PER_SM : 1)
attention_paged(__half *o, float *part, const float *q, const float *qkv, const float *bqkv,
                const float2 *cos_sin, int style, uint8_t *pool, const int *table,
                const int *row_slot, const int *row_pos, int layer, KvGeom g, int n_heads,
                int gq, int pages_per_split, AttTier at) {
    if constexpr (TC)
        attention_mma<HD, KB, VB, S>(o, part, q, qkv, bqkv, cos_sin, style, pool, table, row_slot,
                                  row_pos, layer, g, n_heads, gq, pages_per_split, at,
                                  blockIdx.x, gridDim.x);
    else
        attention_block<HD, GM, KB, VB>(o, part, q, qkv, bqkv, cos_sin, style, pool, table,
                                        row_slot, row_pos, layer, g, n_heads, gq,
                                        pages_per_split, at, blockIdx.x, gridDim.x);
}

/* Both tiers of a two-tier decode step in one launch (leankv's default pair, k8v4 and k4v2).
 * On tensor cores a block takes split blockIdx.x of both tiers (attention_pair_mma); else
 * blocks [0, s0) read the high tier's splits and the rest the low tier's, side by side. */
template <int HD, int GM, int KB0, int VB0, int KB1, int VB1, bool TC>
__global__ void __launch_bounds__(ATT_THREADS(HD), HD == 64 && GM <= 4 ? ATT_BLOCKS_PER_SM : 1)
attention_tiers(__half *o, float *part, const float *q, const float *qkv, const float *bqkv,
                const float2 *cos_sin, int style, uint8_t *pool, const int *table,
                const int *row_slot, const int *row_pos, int layer, KvGeom g0, KvGeom g1,
                int n_heads, int gq, int pages_per_split, AttTier a0, AttTier a1,
                int *n_tok, int *plan) {
    int s0 = a1.split_base;
    if constexpr (TC)
        attention_pair_mma<HD, KB0, VB0, KB1, VB1>(o, part, qkv, bqkv, cos_sin, style, pool,
                                                   table, row_slot, row_pos, layer, g0, g1,
                                                   n_heads, gq, pages_per_split, a0, a1, n_tok,
                                                   plan);
    else if ((int)blockIdx.x < s0)
        attention_block<HD, GM, KB0, VB0>(o, part, q, qkv, bqkv, cos_sin, style, pool, table,
                                          row_slot, row_pos, layer, g0, n_heads, gq,
                                          pages_per_split, a0, blockIdx.x, s0);
    else
        attention_block<HD, GM, KB1, VB1>(o, part, q, qkv, bqkv, cos_sin, style, pool, table,
                                          row_slot, row_pos, layer, g1, n_heads, gq,
                                          pages_per_split, a1, blockIdx.x - s0, gridDim.x - s0);
}

/* ---- Prompt attention on tensor cores.
 * A prompt chunk's rows are consecutive positions of one sequence (gpu_prefill), and its keys
 * and values are all in the cache before any row attends (rope). Where a decode step gives
 * each row a pass of its own over the cache, a warp here fills its 16 matrix rows with
 * 16 / gq consecutive positions times the gq query heads of a KV head, so that every chunk of
 * keys and values is loaded and unpacked once for all of them:
 *   row i of the tile: position r0 + i / gq, query head kvh gq + i % gq
 * The products are attention_mma's, with q and P each split as hi + lo fp16 and run through
 * two products (the decode kernel puts lo in rows g + 8, which here hold rows of their own), so
 * scores and outputs keep fp32's precision. Each row sees the tokens up to its position (the
 * causal mask); the block's warps take chunks w, w + 4, ... of the tile's tokens and merge in
 * shared memory, so each row's (M, L) is final: scores kept for significance (raw, rows at or
 * past raw_first) get it in ml without attention_combine. Block (tile, KV head); tiles run
 * from the last, the longest. Dynamic shared memory: the head's page ids, (width). */
#define PREFILL_THREADS 128
template <int HD, int KB, int VB>
__global__ void __launch_bounds__(PREFILL_THREADS)
attention_prefill_mma(__half *o, float *ml, const float *q, const uint8_t *pool,
                      const int *table, const int *row_slot, const int *row_pos, int n_rows,
                      int layer, KvGeom g, int n_heads, int gq, float *raw, int raw_first,
                      int raw_stride) {
    constexpr int WARPS = PREFILL_THREADS / 32, KSTEPS = HD / 16, NTILES = HD / 8;
    constexpr int KW = MmaChunk<HD, KB, VB>::KW;
    typedef MmaChunk<HD, KB, VB> Chunk;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    int kvh = blockIdx.y, tp = 16 / gq, r0 = (gridDim.x - 1 - blockIdx.x) * tp;
    int pos0 = row_pos[0];
    size_t head_kv = kv_head(g, row_slot[0], layer, kvh);
    int t_end = pos0 + min(r0 + tp, n_rows);   /* the tokens the tile's last row sees */
    extern __shared__ int pf_pages[];
    const int *tab = table + head_kv * g.width;
    for (int i = threadIdx.x; i <= kv_page_index(g, t_end - 1); i += blockDim.x) pf_pages[i] = tab[i];

    /* this lane's two matrix rows, g (A) and g + 8 (B): chunk row, query head, tokens seen */
    int rr[2], hh[2], lim[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int i = gi + 8 * j, ok = i < tp * gq && r0 + i / gq < n_rows;
        rr[j] = r0 + i / gq;
        hh[j] = kvh * gq + i % gq;
        lim[j] = ok ? pos0 + rr[j] + 1 : 0;   /* 0: a row of no query, it sees nothing */
    }
    /* Q as A fragments in the key codes' channel order, hi and lo: rows g and g + 8 */
    uint32_t qh[KSTEPS][4], ql[KSTEPS][4];
    float qsum[2] = {0.0f, 0.0f};
    const float scale = 1.0f / sqrtf((float)HD);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
        float x[2][4], lo[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int ch = mma_q_channel<HD, KB>(ti, 4 * ks + e);
                x[j][e] = lim[j] ? q[((size_t)rr[j] * n_heads + hh[j]) * HD + ch] * scale : 0.0f;
                qsum[j] += x[j][e];
                lo[j][e] = x[j][e] - __half2float(__float2half_rn(x[j][e]));
            }
        qh[ks][0] = half2_bits(x[0][0], x[0][1]);  qh[ks][1] = half2_bits(x[1][0], x[1][1]);
        qh[ks][2] = half2_bits(x[0][2], x[0][3]);  qh[ks][3] = half2_bits(x[1][2], x[1][3]);
        ql[ks][0] = half2_bits(lo[0][0], lo[0][1]);  ql[ks][1] = half2_bits(lo[1][0], lo[1][1]);
        ql[ks][2] = half2_bits(lo[0][2], lo[0][3]);  ql[ks][3] = half2_bits(lo[1][2], lo[1][3]);
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
        qsum[j] += __shfl_xor_sync(0xffffffffu, qsum[j], 1);
        qsum[j] += __shfl_xor_sync(0xffffffffu, qsum[j], 2);
    }
    int keep[2];   /* where this row's scores go in raw, or -1 */
#pragma unroll
    for (int j = 0; j < 2; j++)
        keep[j] = raw && lim[j] && lim[j] - 1 >= raw_first
                      ? ((int)rr[j] * n_heads + hh[j]) * raw_stride : -1;
    __syncthreads();   /* the page ids are in */

    /* the online softmax of rows A and B: acc[j][0, 1] row A's, acc[j][2, 3] row B's */
    float acc[NTILES][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float accz[2] = {0.0f, 0.0f}, acs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < NTILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    auto chunk = [&](const Chunk &ck, int c0) {
        float s4[2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {   /* S^T tile i: tokens 8i .. 8i+7 of the chunk */
            s4[i][0] = s4[i][1] = s4[i][2] = s4[i][3] = 0.0f;
            uint32_t kh[HD / 8];
#pragma unroll
            for (int w = 0; w < KW; w++) mma_codes<KB>(ck.k[i][w], kh + w * (16 / KB));
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ks++) {
                mma_16816(s4[i], qh[ks], kh[2 * ks], kh[2 * ks + 1]);
                mma_16816(s4[i], ql[ks], kh[2 * ks], kh[2 * ks + 1]);
            }
        }
        /* scores of rows A and B at tokens 2t, 2t+1, 2t+8, 2t+9 (u = 0 .. 3) */
        float sc[2][4], mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int t = c0 + 2 * ti + (u & 1) + (u >> 1) * 8;
            float2 sz = KB < 16 ? scale_zero(ck.ksz[u]) : make_float2(1.0f, 0.0f);
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float d = s4[u >> 1][2 * j + (u & 1)];
                if constexpr (KB < 16) d = d * sz.x + sz.y * qsum[j];
                sc[j][u] = t < lim[j] ? d : -INFINITY;
                if (keep[j] >= 0 && t < lim[j]) raw[keep[j] + t] = d;
                mx[j] = fmaxf(mx[j], sc[j][u]);
            }
        }
        int moved = 0;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 1));
            mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 2));
            moved |= mx[j] > m[j];
        }
        if (__any_sync(0xffffffffu, moved)) {   /* rescale what came before */
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float mnew = fmaxf(m[j], mx[j]);
                float corr = mnew == m[j] ? 1.0f : __expf(m[j] - mnew);   /* m = -inf: 0 */
                l[j] *= corr; accz[j] *= corr; acs[j] *= corr;
#pragma unroll
                for (int k = 0; k < NTILES; k++) { acc[k][2 * j] *= corr; acc[k][2 * j + 1] *= corr; }
                m[j] = mnew;
            }
        }
        /* P s as A fragments, hi and lo (rows A, B); the zero terms on the side */
        __half hi[2][4], lo[2][4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float2 sz = VB < 16 ? scale_zero(ck.vsz[u]) : make_float2(1.0f, 0.0f);
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float e = sc[j][u] > -INFINITY ? __expf(sc[j][u] - m[j]) : 0.0f;
                l[j] += e;
                accz[j] += e * sz.y;
                acs[j] += mma_p_split<VB>(e, sz, &hi[j][u], &lo[j][u]);
            }
        }
        uint32_t p[2][4] = {{halves_bits(hi[0][0], hi[0][1]), halves_bits(hi[1][0], hi[1][1]),
                             halves_bits(hi[0][2], hi[0][3]), halves_bits(hi[1][2], hi[1][3])},
                            {halves_bits(lo[0][0], lo[0][1]), halves_bits(lo[1][0], lo[1][1]),
                             halves_bits(lo[0][2], lo[0][3]), halves_bits(lo[1][2], lo[1][3])}};
        mma_values<HD, KB, VB, 2>(acc, ck, p);   /* O += (P s) C_V, hi then lo */
    };
    /* warp w: chunks w, w + WARPS, ... with the next one's loads in flight */
    Chunk cb[2];
    int c = 16 * warp;
    if (c < t_end) mma_load<HD, KB, VB>(cb[0], pool, g, pf_pages, 0, c, t_end, gi, ti);
    /* (unrolled by two, no registers moved: written as mma_pass's loop, one copy of chunk()
     * with the buffers moved along, this measured 6% slower, 190k -> 179k prompt tok/s) */
    for (; c < t_end; c += 32 * WARPS) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int ci = c + i * 16 * WARPS, cn = ci + 16 * WARPS;
            if (ci >= t_end) break;
            if (cn < t_end) mma_load<HD, KB, VB>(cb[i ^ 1], pool, g, pf_pages, 0, cn, t_end, gi, ti);
            chunk(cb[i], ci);
        }
    }

    /* the warps' (m, l, x) of the 16 rows into shared memory, then each row's merge */
    __shared__ float sm_m[WARPS][16], sm_l[WARPS][16], sm_x[WARPS][16][HD];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        l[j] += __shfl_xor_sync(0xffffffffu, l[j], 1);
        l[j] += __shfl_xor_sync(0xffffffffu, l[j], 2);
        accz[j] += __shfl_xor_sync(0xffffffffu, accz[j], 1);
        accz[j] += __shfl_xor_sync(0xffffffffu, accz[j], 2);
        acs[j] += __shfl_xor_sync(0xffffffffu, acs[j], 1);
        acs[j] += __shfl_xor_sync(0xffffffffu, acs[j], 2);
        if (ti == 0) { sm_m[warp][gi + 8 * j] = m[j]; sm_l[warp][gi + 8 * j] = l[j]; }
#pragma unroll
        for (int k = 0; k < NTILES; k++)
#pragma unroll
            for (int e = 0; e < 2; e++)   /* column 2t + e of tile k: channel (2t + e) HD/8 + k */
                sm_x[warp][gi + 8 * j][(2 * ti + e) * (HD / 8) + k] =
                    mma_output<VB>(acc[k][2 * j + e], acs[j], accz[j], k);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < 16 * HD; idx += blockDim.x) {
        int i = idx / HD, ch = idx % HD, r = r0 + i / gq, h = kvh * gq + i % gq;
        if (i >= tp * gq || r >= n_rows) continue;
        float M = -INFINITY, L = 0.0f, A = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w][i]);
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            if (sm_l[w][i] == 0.0f) continue;   /* a warp that saw none of the row's tokens */
            float wt = __expf(sm_m[w][i] - M);
            L += sm_l[w][i] * wt;
            A += sm_x[w][i][ch] * wt;
        }
        o[((size_t)r * n_heads + h) * HD + ch] = __float2half_rn(A / L);
        if (ml && ch == 0 && pos0 + r >= raw_first) {
            ml[((size_t)r * n_heads + h) * 2] = M;
            ml[((size_t)r * n_heads + h) * 2 + 1] = L;
        }
    }
}

/* o from the splits' partials of one (row, head), one warp each (combine_warp).
 * ml, if not NULL, gets (M, L): what turns kept scores into probabilities (a prompt's scores;
 * a two-tier decode step merges in kv_score_decode, other launches in attention_finish). */
__global__ void attention_combine(__half *o, float *ml, const float *part, int n_heads,
                                  int head_dim, int splits) {
    grid_wait();
    grid_release();
    int head = blockIdx.x, r = blockIdx.y;   /* one warp */
    float2 ML = combine_warp(o + ((size_t)r * n_heads + head) * head_dim,
                             part + ((size_t)r * n_heads + head) * splits * (head_dim + 2),
                             head_dim, splits);
    if (ml && threadIdx.x == 0) {
        ml[((size_t)r * n_heads + head) * 2] = ML.x;
        ml[((size_t)r * n_heads + head) * 2 + 1] = ML.y;
    }
}

/* Significance at a decode step (section 3), with the merge of the step's two tiers: block
 * (KV head, row, 256 tokens), a thread a token, enough blocks to hide the latency of the
 * dependent loads (table, then page). Warp h first takes query head h's max M and sum L from
 * the partials (combine_warp; the first block of the row also merges them into o), then every
 * cached token of the KV head, high tier then low, gains the max over the GQA group of this
 * step's probability exp(s - M) / L, from the scores s that attention kept in raw. One launch
 * where there were two (attention_combine, then this). */
#define SCORE_THREADS 256
__global__ void __launch_bounds__(SCORE_THREADS)
kv_score_decode(__half *o, const float *part, uint8_t *pool, const int *table, KvGeom g0,
                KvGeom g1, const int *n_tok, const float *raw, const int *row_slot,
                const int *row_pos, int layer, int n_heads, int gq, int hd, int splits,
                int ctx) {
    __shared__ float sm_ml[8][2];   /* (gq, 2): M and L of each query head */
    grid_wait();
    grid_release();
    int kvh = blockIdx.x, r = blockIdx.y, first = blockIdx.z == 0, warp = threadIdx.x / 32;
    int t = blockIdx.z * SCORE_THREADS + threadIdx.x, pos = row_pos[r], nh = 0, n = 0;
    size_t hh = 0;
    if (pos >= 0) {
        hh = kv_head(g0, row_slot[r], layer, kvh);
        nh = n_tok[hh * 2];
        n = nh + n_tok[hh * 2 + 1];
    }
    if (!first && blockIdx.z * SCORE_THREADS >= n) return;   /* the whole block: past the tokens */
    if (warp < gq) {   /* a padding row's partials are empty: its o becomes 0 */
        int head = kvh * gq + warp;
        float2 ML = combine_warp(first ? o + ((size_t)r * n_heads + head) * hd : NULL,
                                 part + ((size_t)r * n_heads + head) * splits * (hd + 2), hd,
                                 splits);
        if (threadIdx.x % 32 == 0) { sm_ml[warp][0] = ML.x; sm_ml[warp][1] = ML.y; }
    }
    __syncthreads();
    if (t >= n) return;
    float mx = step_gain(raw + ((size_t)r * n_heads + kvh * gq) * ctx + t, ctx, &sm_ml[0][0], gq);
    int s, tier = t < nh ? LKV_HIGH : LKV_LOW;
    const KvGeom &g = tier ? g1 : g0;
    uint8_t *page = kv_page(pool, table, g, hh, tier, tier ? t - nh : t, &s);
    ((float *)(page + g.scores))[s] += mx;
}

/* hb = silu(g) * u, with silu(g) = g * sigmoid(g); gu holds g then u for each row */
__global__ void swiglu(__half *hb, const float *gu, int rows, int hidden) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * hidden) return;
    size_t r = i / hidden, j = i % hidden;
    float g = gu[r * 2 * hidden + j], u = gu[r * 2 * hidden + hidden + j];
    hb[i] = __float2half_rn(silu_mul(g, u));
}

/* ----------------------------------------------------------------------------------------
 * Greedy sampling on the GPU, so that a step sends back one int per row, not the logits. */

/* next[b] = the index of the largest logit of row b; ties go to the smaller index, as on the CPU */
__global__ void argmax(int *next, const float *logits, int vocab) {
    grid_wait();
    const float *x = logits + (size_t)blockIdx.x * vocab;
    float best = -INFINITY;
    int bi = vocab;
    /* 16-byte loads, four in flight; a thread's indices only grow, so '>' keeps the first */
    int v4 = (vocab % 4 == 0) ? vocab / 4 : 0;
#pragma unroll 4
    for (int j = threadIdx.x; j < v4; j += blockDim.x) {
        float4 f = ((const float4 *)x)[j];
        if (f.x > best) { best = f.x; bi = 4 * j; }
        if (f.y > best) { best = f.y; bi = 4 * j + 1; }
        if (f.z > best) { best = f.z; bi = 4 * j + 2; }
        if (f.w > best) { best = f.w; bi = 4 * j + 3; }
    }
    for (int i = 4 * v4 + threadIdx.x; i < vocab; i += blockDim.x)   /* vocab not a multiple of 4 */
        if (x[i] > best) { best = x[i]; bi = i; }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        best = lane < (int)(blockDim.x / 32) ? sv[lane] : -INFINITY;
        bi = lane < (int)(blockDim.x / 32) ? si[lane] : vocab;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) next[blockIdx.x] = bi < vocab ? bi : 0;
    }
}

/* ----------------------------------------------------------------------------------------
 * The engine: the model, the cache and the activations, and the steps that drive them. */

#define MAX_BUCKETS 16          /* decode graphs for batch sizes 1, 2, 4, ... 2^15 */

struct GpuEngine;
/* one attention launch: which rows, which tier, where the queries come from and the output goes */
typedef struct {
    int layer, n_rows, splits, tier;
    const float *qkv;    /* decode: the rows' q, k, v before RoPE (attention ropes them); NULL:
                            prefill, the rotated queries are in s->q */
    const float *bqkv;   /* their biases, or NULL */
    __half *o;           /* (rows, n_heads * head_dim) output */
    AttTier at;
} AttCall;
typedef void (*AttentionLaunch)(struct GpuEngine *, const AttCall *);
typedef void (*PrefillLaunch)(struct GpuEngine *, const AttCall *, float *ml);

struct GpuEngine {
    Config c;                               /* the model's hyperparameters */
    int max_slots;                          /* sequences held at once */
    int max_rows;                           /* rows of every activation buffer */
    int chunk;                              /* prompt rows per forward pass */
    int ctx;                                /* tokens a slot can hold */
    int n_sms;                              /* multiprocessors, to size attention splits */
    int pages_per_split;                    /* attention splits: this many pages each */
    int max_splits;                         /* splits of a ctx-token sequence (all tiers) */
    int splits_t[LKV_MAX_TIERS];            /* decode splits of each tier over ctx tokens */
    int profile_step, steps;                /* LEANKV_PROFILE_STEP: profile that decode step */
    int prefill_slot;                       /* the slot gpu_prefill is running */
    int place_smem;                         /* kv_place_head's dynamic shared memory */
    int pdl;                                /* launch_pdl overlaps kernels (LEANKV_PDL=0: off) */
    int matvec;                             /* decode steps run matvec: an engine of at most
                                               MATVEC_ROWS slots (LEANKV_MATVEC=0: cuBLAS). Per
                                               engine, not per step, so that a request's output
                                               never depends on how many others run with it */
    cudaStream_t stream;                    /* every launch and copy, in order */
    cublasHandle_t blas;
    void *blas_ws;                          /* cuBLAS workspace, set once so graphs can hold it */
    DeviceWeights w;                        /* no layers: the cache-only test engine */
    float2 *rope_cs;                        /* (ctx, head_dim/2) cos, sin of pos * freq_i */
    KVCache kv;
    AttentionLaunch attention_t[LKV_MAX_TIERS]; /* [n_tiers] the kernel of each tier (attention_t[0]:
                                               the only one of a one-precision cache) */
    void (*attention_pair)(struct GpuEngine *, const AttCall *, const AttTier *); /* both tiers
                                               in one launch, or NULL: one launch per tier */
    int pair_blocks;                        /* blocks of attention_pair per split of both tiers: 1
                                               on tensor cores (attention_pair_mma), else 2 */
    int own_heads;                          /* a decode step's attention block writes its head's
                                               token and adds its scores (one_block_heads) */
    int scores_sm_bytes;                    /* bytes of shared memory that such a block keeps
                                               the scores in, or 0: they do not fit (keep_bytes) */
    PrefillLaunch attention_prefill;        /* prompt chunks on tensor cores, or NULL: the
                                               decode kernel, a pass per row */
    RunState s;
    cudaGraphExec_t graph[MAX_BUCKETS];     /* decode step per batch size 2^i, made on first use */
    float *test_qkv;                        /* (n_layers, max_rows, QD + 2*KVD) test engine input */
    __half *test_o;                         /* (n_layers, max_rows, QD) its attention output */
};

/* Attention for n_rows rows whose positions are below att_ctx. Splits sit at fixed multiples
 * of pages_per_split pages, the same for every step of an engine, so that a row's arithmetic
 * does not depend on the rest of the batch (batched output = output alone). */
template <int HD, int GM, int KB, int VB, bool TC = false, int S = 2>
static void launch_attention(GpuEngine *g, const AttCall *a) {
    Config *c = &g->c;
    RunState *s = &g->s;
    dim3 grid(a->splits, c->n_kv_heads, a->n_rows), block(ATT_THREADS(HD));
    size_t smem = TC ? g->pages_per_split * sizeof(int) : 0;   /* attention_mma's page ids */
    launch_pdl(g->pdl, attention_paged<HD, GM, KB, VB, TC, S>, grid, block, smem, g->stream,
               a->o, s->att_part, s->q, a->qkv, a->bqkv, g->rope_cs, c->rope_style, g->kv.pool,
               g->kv.table, s->row_slot, s->row_pos, a->layer, g->kv.tg[a->tier],
               c->n_heads, c->n_heads / c->n_kv_heads, g->pages_per_split, a->at);
}

/* attention_pair_mma's dynamic shared memory: both tiers' page ids, the stash, and keep bytes
 * of scores (keep_bytes) */
static int tiers_smem(int head_dim, int pages_per_split, int keep) {
    return (2 * pages_per_split + (head_dim / 4 + 2) * ATT_THREADS(head_dim)) * 4 + keep;
}
template <int HD> static void tiers_smem_setup(int pages_per_split, int keep) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_tiers<HD, 4, 8, 4, 4, 2, true>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    tiers_smem(HD, pages_per_split, keep)));
}

/* both tiers at once: a0 the high tier's, a1 the low's (a block each: a1.split_base = the
 * high splits; one block for both on tensor cores) */
template <int HD, int GM, bool TC>
static void launch_tiers(GpuEngine *g, const AttCall *a, const AttTier *at) {
    Config *c = &g->c;
    RunState *s = &g->s;
    dim3 grid(at[0].total_splits, c->n_kv_heads, a->n_rows), block(ATT_THREADS(HD));
    size_t smem = TC ? tiers_smem(HD, g->pages_per_split, g->scores_sm_bytes) : 0;
    launch_pdl(g->pdl, attention_tiers<HD, GM, 8, 4, 4, 2, TC>, grid, block, smem, g->stream,
               a->o, s->att_part, s->q, a->qkv, a->bqkv, g->rope_cs, c->rope_style, g->kv.pool,
               g->kv.table, s->row_slot, s->row_pos, a->layer, g->kv.tg[0], g->kv.tg[1],
               c->n_heads, c->n_heads / c->n_kv_heads, g->pages_per_split, at[0], at[1],
               g->kv.n_tok, g->own_heads ? g->kv.plan : NULL);
}
typedef void (*PairLaunch)(GpuEngine *, const AttCall *, const AttTier *);
static const PairLaunch pair_kernels[2][5] = {
    {launch_tiers<64, 1, false>, launch_tiers<64, 2, false>, launch_tiers<64, 3, false>,
     launch_tiers<64, 4, false>, launch_tiers<64, 8, false>},
    {launch_tiers<128, 1, false>, launch_tiers<128, 2, false>, launch_tiers<128, 3, false>,
     launch_tiers<128, 4, false>, launch_tiers<128, 8, false>}};
/* on tensor cores: one kernel serves every GQA group size up to 8 */
static const PairLaunch pair_kernels_tc[2] = {launch_tiers<64, 4, true>, launch_tiers<128, 4, true>};

/* the instantiated kernels: head dim 64 or 128; query heads per KV head rounded up to 1, 2, 3,
 * 4 or 8; keys at 16, 8, 4 or 2 bits and values at no more bits than keys (gpu_build refuses
 * other caches) */
#define ATT_PAIRS(HD, GM) \
    {16, 16, launch_attention<HD, GM, 16, 16>}, {16, 8, launch_attention<HD, GM, 16, 8>}, \
    {16, 4, launch_attention<HD, GM, 16, 4>}, {16, 2, launch_attention<HD, GM, 16, 2>},   \
    {8, 8, launch_attention<HD, GM, 8, 8>}, {8, 4, launch_attention<HD, GM, 8, 4>},       \
    {8, 2, launch_attention<HD, GM, 8, 2>}, {4, 4, launch_attention<HD, GM, 4, 4>},       \
    {4, 2, launch_attention<HD, GM, 4, 2>}, {2, 2, launch_attention<HD, GM, 2, 2>}
#define ATT_GROUPS(HD) \
    {ATT_PAIRS(HD, 1)}, {ATT_PAIRS(HD, 2)}, {ATT_PAIRS(HD, 3)}, {ATT_PAIRS(HD, 4)}, {ATT_PAIRS(HD, 8)}
static const struct { int kb, vb; AttentionLaunch fn; } attention_kernels[2][5][10] = {
    {ATT_GROUPS(64)}, {ATT_GROUPS(128)}};
#undef ATT_GROUPS
#undef ATT_PAIRS

/* the tensor-core kernels: fp16, and code keys with one scale/zero pair a vector */
#define TC_PAIRS(HD) \
    {16, 16, launch_attention<HD, 4, 16, 16, true>}, {8, 8, launch_attention<HD, 4, 8, 8, true>}, \
    {8, 4, launch_attention<HD, 4, 8, 4, true>}, {8, 2, launch_attention<HD, 4, 8, 2, true>}, \
    {4, 4, launch_attention<HD, 4, 4, 4, true>}, \
    {4, 2, launch_attention<HD, 4, 4, 2, true>}, {2, 2, launch_attention<HD, 4, 2, 2, true>}
static const struct { int kb, vb; AttentionLaunch fn; } attention_kernels_tc[2][7] = {
    {TC_PAIRS(64)}, {TC_PAIRS(128)}};
#undef TC_PAIRS

/* ... and for code keys over splits of ATT_DEEP_TOKENS tokens or more, with two chunks in
 * flight per warp, not one (164 registers instead of 151 for k8v4: still 3 blocks an SM).
 * Measured (bench/RESULTS.md, session 7): attention alone at batch 64 and 8k (4,096-token
 * splits) 5-7% faster; whole decode steps at batch 64 level at 8k, but 3% slower at 4k
 * (2,112-token splits) and 6% slower at 2k, hence the bound. */
#define ATT_DEEP_TOKENS 4096
#define TC_DEEP(HD) \
    {8, 8, launch_attention<HD, 4, 8, 8, true, 3>}, {8, 4, launch_attention<HD, 4, 8, 4, true, 3>}, \
    {8, 2, launch_attention<HD, 4, 8, 2, true, 3>}, {4, 4, launch_attention<HD, 4, 4, 4, true, 3>}, \
    {4, 2, launch_attention<HD, 4, 4, 2, true, 3>}, {2, 2, launch_attention<HD, 4, 2, 2, true, 3>}
static const struct { int kb, vb; AttentionLaunch fn; } attention_kernels_deep[2][6] = {
    {TC_DEEP(64)}, {TC_DEEP(128)}};
#undef TC_DEEP

/* A prompt chunk's attention (attention_prefill_mma): a block per tile of 16 / gq rows and KV
 * head; ml gets the (M, L) of rows whose scores are kept (a.at.raw), else NULL */
template <int HD, int KB, int VB>
static void launch_prefill(GpuEngine *g, const AttCall *a, float *ml) {
    Config *c = &g->c;
    RunState *s = &g->s;
    int gq = c->n_heads / c->n_kv_heads, tp = 16 / gq;
    dim3 grid((a->n_rows + tp - 1) / tp, c->n_kv_heads);
    attention_prefill_mma<HD, KB, VB><<<grid, PREFILL_THREADS, g->kv.tg[0].width * sizeof(int),
                                        g->stream>>>(
        a->o, ml, s->q, g->kv.pool, g->kv.table, s->row_slot, s->row_pos, a->n_rows, a->layer,
        g->kv.tg[0], c->n_heads, gq, a->at.raw, a->at.raw_first, a->at.raw_stride);
}
#define PREFILL_PAIRS(HD) \
    {16, 16, launch_prefill<HD, 16, 16>}, {8, 8, launch_prefill<HD, 8, 8>}, \
    {8, 4, launch_prefill<HD, 8, 4>}, {8, 2, launch_prefill<HD, 8, 2>}, \
    {4, 4, launch_prefill<HD, 4, 4>}, {4, 2, launch_prefill<HD, 4, 2>}, \
    {2, 2, launch_prefill<HD, 2, 2>}
static const struct { int kb, vb; PrefillLaunch fn; } prefill_kernels[2][7] = {
    {PREFILL_PAIRS(64)}, {PREFILL_PAIRS(128)}};
#undef PREFILL_PAIRS

/* An on/off switch from the environment (to measure one way against the other): dflt when the
 * variable is unset or empty, else off for "0" and on for anything else. */
static int env_switch(const char *name, int dflt) {
    const char *e = getenv(name);
    return e && *e ? strcmp(e, "0") != 0 : dflt;
}

/* Tensor cores serve code keys with one scale and zero per vector, and the fp16 cache, for
 * gq <= 8; the environment variable LEANKV_ATT_SIMT=1 turns them off. */
static int use_tensor_cores(LkvPrecision p) {
    return (p.kbits < 16 || p.vbits == 16) && p.groups == 1 && !env_switch("LEANKV_ATT_SIMT", 0);
}

/* LEANKV_ATT_STAGES=2 or 3 fixes the chunks a warp of the tensor-core decode kernel has in
 * flight plus one, whatever the split (to measure one against the other); 0 when unset. Any
 * other value is taken as 2, with one warning however many engines and tiers ask. */
static int att_stages_env(void) {
    static int warned = 0;
    const char *e = getenv("LEANKV_ATT_STAGES");
    if (!e || !*e) return 0;
    if (!strcmp(e, "2") || !strcmp(e, "3")) return atoi(e);
    if (!warned++)
        fprintf(stderr, "leankv: warning: LEANKV_ATT_STAGES=%s is neither 2 nor 3; taken as 2\n", e);
    return 2;
}

/* The decode attention kernel for splits of split_tokens tokens: on tensor cores, three stages
 * from ATT_DEEP_TOKENS on (att_stages_env overrides). */
static AttentionLaunch find_attention(int head_dim, int gq, LkvPrecision p, int split_tokens) {
    int hi = head_dim == 64 ? 0 : head_dim == 128 ? 1 : -1;
    int gi = gq <= 4 ? gq - 1 : gq <= 8 ? 4 : -1;
    if (hi < 0 || gi < 0) return NULL;
    int kb = p.kbits, vb = p.vbits, stages = att_stages_env();
    int deep = stages ? stages == 3 : split_tokens >= ATT_DEEP_TOKENS;
    if (use_tensor_cores(p) && kb < 16 && deep)
        for (int i = 0; i < 6; i++)
            if (attention_kernels_deep[hi][i].kb == kb && attention_kernels_deep[hi][i].vb == vb)
                return attention_kernels_deep[hi][i].fn;
    if (use_tensor_cores(p))
        for (int i = 0; i < 7; i++)
            if (attention_kernels_tc[hi][i].kb == kb && attention_kernels_tc[hi][i].vb == vb)
                return attention_kernels_tc[hi][i].fn;
    for (int i = 0; i < 10; i++)
        if (attention_kernels[hi][gi][i].kb == kb && attention_kernels[hi][gi][i].vb == vb)
            return attention_kernels[hi][gi][i].fn;
    return NULL;
}

/* Two tiers: does one block of attention_pair_mma see all of a head's tokens (one split of
 * each tier)? Then it writes the step's token, attends and adds the scores, in one launch
 * (LEANKV_TIER_KERNELS=1: in kv_write_token and kv_score_decode still, to measure them). */
static int one_block_heads(const GpuEngine *g) {
    return g->attention_pair && g->pair_blocks == 1 && g->splits_t[0] == 1 &&
           g->splits_t[1] == 1 && !env_switch("LEANKV_TIER_KERNELS", 0);
}

/* Where a block owns its head: the shared memory that holds its scores, the tokens' old ones
 * (ctx) and the step's raw ones (gq, ctx), when the block's dynamic shared memory then stays
 * within KEEP_SM_MAX (ctx 2048 at gq 3 does, 4096 does not); else 0, and the scores stay in
 * global memory. LEANKV_KEEP_SM=0 forces the latter, to test and time it. KEEP_SM_MAX keeps
 * ATT_BLOCKS_PER_SM = 3 blocks on an H100 multiprocessor: 3 x (64 KB + the kernel's 5 KB of
 * static shared memory + the 1 KB the driver reserves a block) = 210 KB of its 228 KB. */
#define KEEP_SM_MAX (64 * 1024)
static int keep_bytes(const GpuEngine *g) {
    int gq = g->c.n_heads / g->c.n_kv_heads, keep = (gq + 1) * g->ctx * (int)sizeof(float);
    int rest = tiers_smem(g->c.head_dim, g->pages_per_split, 0);
    return g->own_heads && rest + keep <= KEEP_SM_MAX && env_switch("LEANKV_KEEP_SM", 1) ? keep : 0;
}

/* The prompt kernel on tensor cores for the first tier's precision (prompts are written there),
 * or NULL: then each row of a prompt chunk runs the decode kernel. LEANKV_PREFILL_ROWS=1
 * forces the latter, to measure one against the other. */
static PrefillLaunch find_prefill(int head_dim, int gq, LkvPrecision p, int width) {
    int hi = head_dim == 64 ? 0 : head_dim == 128 ? 1 : -1;
    if (hi < 0 || gq > 8 || !use_tensor_cores(p) || width * sizeof(int) > 48 * 1024 ||
        env_switch("LEANKV_PREFILL_ROWS", 0))
        return NULL;
    for (int i = 0; i < 7; i++)
        if (prefill_kernels[hi][i].kb == p.kbits && prefill_kernels[hi][i].vb == p.vbits)
            return prefill_kernels[hi][i].fn;
    return NULL;
}

static void combine(GpuEngine *g, int n_rows, int splits, __half *o, float *ml) {
    Config *c = &g->c;
    launch_pdl(g->pdl, attention_combine, dim3(c->n_heads, n_rows), dim3(32), 0,
               g->stream, o, ml, g->s.att_part, c->n_heads, c->head_dim, splits);
}

/* Attention of n_rows rows (positions below att_ctx) into o. A decode step (decode = 1) ropes
 * its queries inside the kernel; a prompt chunk's are in s->q already.
 *   one tier: one launch, plus attention_combine when split
 *   two tiers, decode: a launch per tier over the head's own tokens of that tier, at its own
 *     precision (or one launch for both), writing partials that kv_score_decode merges before
 *     it adds the step's probabilities to the tokens' scores -- unless one block saw all of a
 *     head's tokens (attention_pair_mma, one split), which does both itself
 *   two tiers, a prompt chunk holding counted rows: the scores are kept, and kv_score_prefill
 *     adds the rows' probabilities to the prompt sums */
static void attention(GpuEngine *g, int layer, int n_rows, int att_ctx, int decode,
                      const float *qkv, const float *bqkv, __half *o) {
    KVCache *kv = &g->kv;
    Config *c = &g->c;
    int gq = c->n_heads / c->n_kv_heads;
    AttCall a;
    memset(&a, 0, sizeof a);
    a.layer = layer; a.n_rows = n_rows; a.tier = LKV_HIGH; a.qkv = decode ? qkv : NULL;
    a.bqkv = bqkv; a.o = o; a.at.raw_stride = g->ctx;
    if (kv->n_tiers > 1 && decode) {
        int s0 = g->splits_t[0], s1 = g->splits_t[1], one = g->attention_pair && g->pair_blocks == 1;
        int total = one ? (s0 > s1 ? s0 : s1) : s0 + s1;   /* partials per (row, head) */
        AttTier at[2];
        for (int t = 0; t < 2; t++)
            at[t] = (AttTier){kv->n_tok, t, t && !one ? s0 : 0, total, kv->raw, 0, g->ctx,
                              NULL, g->scores_sm_bytes > 0};
        if (g->attention_pair) g->attention_pair(g, &a, at);   /* one launch for both */
        else
            for (int t = 0; t < 2; t++) {
                a.tier = t;
                a.splits = g->splits_t[t];
                a.at = at[t];
                g->attention_t[t](g, &a);
            }
        LAUNCH_CHECK();
        if (g->own_heads) return;   /* attention_pair_mma merged and scored in place */
        launch_pdl(g->pdl, kv_score_decode,
                   dim3(c->n_kv_heads, n_rows, (g->ctx + SCORE_THREADS - 1) / SCORE_THREADS),
                   dim3(SCORE_THREADS), 0,
                   g->stream, o, g->s.att_part, kv->pool, kv->table, kv->tg[0], kv->tg[1],
                   kv->n_tok, kv->raw, g->s.row_slot, g->s.row_pos, layer, c->n_heads, gq,
                   c->head_dim, total, g->ctx);
        LAUNCH_CHECK();
        return;
    }
    int pages = lkv_pages_for(att_ctx, kv->tg[0].tpp);
    a.splits = (pages + g->pages_per_split - 1) / g->pages_per_split;
    if (a.splits < 1) a.splits = 1;
    /* a prompt chunk whose last row is counted (prompts run alone: rows are consecutive) */
    int scores = kv->n_tiers > 1 && !decode &&
                 att_ctx - 1 >= kv->h_policy[g->prefill_slot].first;
    if (scores) { a.at.raw = kv->raw; a.at.raw_first = kv->h_policy[g->prefill_slot].first; }
    if (!decode && g->attention_prefill) {   /* a block per tile of rows: (M, L) are final */
        g->attention_prefill(g, &a, scores ? kv->ml : NULL);
        LAUNCH_CHECK();
    } else {
        if (!scores && a.splits > 1) a.at.arrive = g->s.arrive;   /* the last split's block merges */
        g->attention_t[0](g, &a);
        LAUNCH_CHECK();
        if (scores) combine(g, n_rows, a.splits, o, kv->ml);
    }
    if (scores) {
        kv_score_prefill<<<dim3(c->n_heads, (att_ctx + PSCORE_TOKENS - 1) / PSCORE_TOKENS),
                           PSCORE_TOKENS * PSCORE_PARTS, 0, g->stream>>>(
            kv->pscore, kv->raw, kv->ml, g->s.row_slot, g->s.row_pos, n_rows, kv->policy, layer,
            c->n_heads, g->ctx);
        LAUNCH_CHECK();
    }
}

/* The attention block of layer l from the projected rows qkv to o: RoPE, the new keys and
 * values into the cache (a prompt chunk: rope; a decode step: inside attention_paged, or
 * kv_write_token's tier cases on a two-tier cache), then attention. */
static void attend(GpuEngine *g, int l, int n_rows, int att_ctx, int decode, const float *qkv,
                   const float *bqkv, __half *o) {
    Config *c = &g->c;
    RunState *s = &g->s;
    KVCache *kv = &g->kv;
    int hd = c->head_dim, KVD = c->n_kv_heads * hd;
    if (!decode) {   /* a prompt chunk: all keys in the cache before any row attends */
        int rope_t = c->n_kv_heads * hd > c->n_heads * hd / 2 ? c->n_kv_heads * hd : c->n_heads * hd / 2;
        rope_t = rope_t > 1024 ? 1024 : (rope_t + 31) / 32 * 32;
        rope<<<n_rows, rope_t, 2 * KVD * sizeof(float), g->stream>>>(
            s->q, kv->pool, qkv, bqkv, g->rope_cs, kv->table, s->row_slot, s->row_pos, l,
            kv->tg[0], c->n_heads, hd, c->rope_style);
        LAUNCH_CHECK();
    } else if (kv->n_tiers > 1 && !g->own_heads) {   /* (else attention writes it) */
        launch_pdl(g->pdl, kv_write_token, dim3(c->n_kv_heads, n_rows), dim3(128), 0, g->stream,
                   kv->pool, kv->table, kv->tg[0], kv->tg[1], kv->n_tok, kv->plan, qkv, bqkv,
                   g->rope_cs, c->rope_style, s->row_slot, s->row_pos, l, c->n_heads, hd);
        LAUNCH_CHECK();
    }
    attention(g, l, n_rows, att_ctx, decode, qkv, bqkv, o);
}

/* Runs the n_rows rows staged in s->rows through the model; the n_out rows listed in out_rows
 * get logits and an argmax in next. Every position is below att_ctx; decode = 1 when every row
 * is a different sequence. Enqueues only: no host synchronisation, so that a decode step can be
 * captured into a graph. */
static void forward(GpuEngine *g, int n_rows, int n_out, int att_ctx, int decode) {
    Config *c = &g->c;
    RunState *s = &g->s;
    DeviceWeights *w = &g->w;
    cudaStream_t st = g->stream;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim;
    int QD = c->n_heads * hd, KVD = c->n_kv_heads * hd;
    if (!w->layers) {   /* the cache-only test engine: each layer's q, k, v come from the test */
        for (int l = 0; l < c->n_layers; l++)
            attend(g, l, n_rows, att_ctx, decode,
                   g->test_qkv + (size_t)l * g->max_rows * (QD + 2 * KVD), NULL,
                   g->test_o + (size_t)l * g->max_rows * QD);
        return;
    }
    int rms_t = rmsnorm_threads(D);

    launch_pdl(g->pdl, embed, dim3(n_rows), dim3(256), 0, st, s->x, w->tok_embeddings,
               s->row_token, D);
    if (decode && g->matvec) {
        /* a small engine's decode step: five launches a layer, the residual added in place */
        for (int l = 0; l < c->n_layers; l++) {
            DeviceLayer *L = &w->layers[l];
            /* x += Wo attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x) */
            matvec_launch<MV_NORM>(g->pdl, st, s->qkv, 0, s->x, L->attn_norm, L->wqkv, n_rows,
                                   D, QD + 2 * KVD, c->norm_eps);
            attend(g, l, n_rows, att_ctx, decode, s->qkv, L->bqkv, s->o);
            matvec_launch<MV_HALF>(g->pdl, st, s->x, 1, s->o, NULL, L->wo, n_rows, QD, D, 0.0f);
            /* x += W2 (silu(W1 xn) * W3 xn), xn = rmsnorm(x) */
            matvec_launch<MV_NORM>(g->pdl, st, s->gu, 0, s->x, L->ffn_norm, L->w13, n_rows, D,
                                   2 * H, c->norm_eps);
            matvec_launch<MV_SWIGLU>(g->pdl, st, s->x, 1, s->gu, NULL, L->w2, n_rows, H, D, 0.0f);
        }
        /* logits = Wout rmsnorm(x): every row is wanted in a decode step */
        matvec_launch<MV_NORM>(g->pdl, st, s->logits, 0, s->x, w->norm, w->output, n_rows, D,
                               c->vocab_size, c->norm_eps);
        launch_pdl(g->pdl, argmax, dim3(n_rows), dim3(1024), 0, st, s->next, s->logits,
                   c->vocab_size);
        return;
    }
    for (int l = 0; l < c->n_layers; l++) {
        DeviceLayer *L = &w->layers[l];
        /* attention block: x += Wo attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x);
         * the previous layer's FFN output y joins x inside this rmsnorm */
        rmsnorm<<<n_rows, rms_t, 0, st>>>(s->xb, s->x, l ? s->y : NULL, L->attn_norm, NULL, D,
                                          c->norm_eps);
        LAUNCH_CHECK();
        matmul(g->blas, s->qkv, s->xb, L->wqkv, n_rows, D, QD + 2 * KVD);
        attend(g, l, n_rows, att_ctx, decode, s->qkv, L->bqkv, s->o);
        matmul(g->blas, s->y, s->o, L->wo, n_rows, QD, D);

        /* feed-forward block: x += W2 (silu(W1 xn) * W3 xn), xn = rmsnorm(x) */
        rmsnorm<<<n_rows, rms_t, 0, st>>>(s->xb, s->x, s->y, L->ffn_norm, NULL, D, c->norm_eps);
        LAUNCH_CHECK();
        matmul(g->blas, s->gu, s->xb, L->w13, n_rows, D, 2 * H);
        swiglu<<<(n_rows * H + 255) / 256, 256, 0, st>>>(s->hb, s->gu, n_rows, H);
        LAUNCH_CHECK();
        matmul(g->blas, s->y, s->hb, L->w2, n_rows, H, D);
    }
    if (n_out == 0) return;   /* a middle chunk of a prompt: only its KV entries matter */
    /* logits = Wout rmsnorm(x), for the wanted rows only */
    rmsnorm<<<n_out, rms_t, 0, st>>>(s->xo, s->x, s->y, w->norm, s->out_rows, D, c->norm_eps);
    LAUNCH_CHECK();
    matmul(g->blas, s->logits, s->xo, w->output, n_out, D, c->vocab_size);
    launch_pdl(g->pdl, argmax, dim3(n_out), dim3(1024), 0, st, s->next, s->logits,
               c->vocab_size);
}

/* RoPE angles, once, on the host with the CPU rope's formulas: the GPU rotates by the very
 * same cos and sin. The cache-only test engine does not rotate (cos 1, sin 0: exact). */
static void build_rope_table(GpuEngine *g) {
    int half = g->c.head_dim / 2;
    float2 *t = (float2 *)malloc((size_t)g->ctx * half * sizeof(float2));
    for (int i = 0; i < half; i++) {
        float freq = powf(g->c.rope_theta, -(float)(2 * i) / (float)g->c.head_dim);
        for (int pos = 0; pos < g->ctx; pos++) {
            float ang = pos * freq;
            t[(size_t)pos * half + i] = g->w.layers ? make_float2(cosf(ang), sinf(ang))
                                                    : make_float2(1.0f, 0.0f);
        }
    }
    g->rope_cs = (float2 *)dmalloc((size_t)g->ctx * half * sizeof(float2));
    CUDA_CHECK(cudaMemcpy(g->rope_cs, t, (size_t)g->ctx * half * sizeof(float2),
                          cudaMemcpyHostToDevice));
    free(t);
}

/* page reservation for the rows staged in s->rows (see kv_reserve), one-tier caches */
static void reserve(GpuEngine *g, int n_rows) {
    kv_reserve<<<1, RESERVE_THREADS, 0, g->stream>>>(g->kv.table, g->kv.free_ids, g->kv.ring,
                                                      g->s.row_slot, g->s.row_pos, n_rows,
                                                      g->kv.tg[0]);
    LAUNCH_CHECK();
}

/* The memory manager's steps 2 and 3 on a two-tier cache (step 1, a kv_prepare_* kernel, has
 * filled want): the prefix sum, then the take or the give, then the ring's ends. */
static void kv_scan(GpuEngine *g) {
    KVCache *kv = &g->kv;
    int n = kv->n_heads_total * 2;
    CUDA_CHECK(cub::DeviceScan::ExclusiveSum(kv->scan_tmp, kv->scan_tmp_bytes, kv->want,
                                             kv->offset, n, g->stream));
    kv_total<<<1, 1, 0, g->stream>>>(kv->ring, kv->want, kv->offset, n);
    LAUNCH_CHECK();
}

/* Applies what want says for every head at once (section 6's third step): take = 1 moves
 * each head's range of the free ring into its table, take = 0 moves its pages back. A give
 * returns the pool's free pages after it (read back: a give happens per request, not per
 * step); a take returns -1 (the host knew the count before asking). */
static int kv_apply(GpuEngine *g, int take) {
    KVCache *kv = &g->kv;
    int n = kv->n_heads_total * 2, blocks = (n + 255) / 256;
    kv_scan(g);
    if (take)
        kv_apply_take<<<blocks, 256, 0, g->stream>>>(kv->table, kv->free_ids, kv->want,
                                                     kv->offset, kv->n_pg, kv->ring, n,
                                                     kv->tg[0].width, kv->tg[0].n_pages);
    else
        kv_apply_give<<<blocks, 256, 0, g->stream>>>(kv->free_ids, kv->table, kv->want,
                                                     kv->offset, kv->n_pg, kv->ring, n,
                                                     kv->tg[0].width, kv->tg[0].n_pages);
    kv_ring_update<<<1, 1, 0, g->stream>>>(kv->ring, take, kv->tg[0].n_pages);
    LAUNCH_CHECK();
    if (take) return -1;
    CUDA_CHECK(cudaMemcpyAsync(kv->h_free, kv->ring + 1, sizeof(int), cudaMemcpyDeviceToHost,
                               g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return *kv->h_free;
}

/* pages a run of rows at positions pos0 .. pos0+n-1 opens, over all heads (one tier) */
static int pages_opened(const GpuEngine *g, int pos0, int n) {
    int tpp = g->kv.tg[0].tpp;
    int pages_before = lkv_pages_for(pos0, tpp), pages_after = lkv_pages_for(pos0 + n, tpp);
    return (pages_after - pages_before) * g->c.n_layers * g->c.n_kv_heads;
}

/* A decode step of `rows` rows: page reservation (one tier: by position; two tiers: the pages
 * the planned cases take), then the forward pass with every row's logits (out_rows holds
 * 0 .. rows-1). */
static void decode_step(GpuEngine *g, int rows) {
    KVCache *kv = &g->kv;
    if (kv->n_tiers > 1) {
        int heads = g->c.n_layers * g->c.n_kv_heads;
        kv_prepare_planned<<<(rows * heads + 255) / 256, 256, 0, g->stream>>>(
            kv->want, kv->plan, kv->n_tok, kv->n_pg, g->s.row_slot, g->s.row_pos, rows, heads,
            kv->tg[0].tpp, kv->tg[1].tpp);
        LAUNCH_CHECK();
        kv_apply(g, 1);
    } else reserve(g, rows);
    forward(g, rows, rows, g->ctx, 1);
}

/* Attention splits of a sequence of `pages` pages: about enough blocks to fill the GPU once
 * (ATT_BLOCKS_PER_SM resident per SM) when `slots` sequences decode (busy_slots) -- measured:
 * splitting further costs more in partials and merging than it gains, for the tensor-core
 * kernel too -- but no split shorter than 2 pages of fp16 keys (attention_block) or
 * ATT_LEAST_PAGES = 8 of codes or on tensor cores (two passes of a block over 64 tokens), and
 * none longer than 4096 pages (attention_mma keeps a split's page ids in shared memory). Small
 * engines are where the least counts: at batch 1 and 4k, 8-page splits decode 11% faster than
 * 4-page ones (two chunks a warp in flight, half the partials to merge); 16 pages was 2% faster
 * still there but 4-6% slower with a 128-token prompt or at batch 4 (bench/RESULTS.md,
 * session 7). */
static int split_pages(int pages, int n_sms, int slots, int n_kv_heads, LkvPrecision p) {
    int want = ATT_BLOCKS_PER_SM * n_sms / (slots * n_kv_heads);
    if (want < 1) want = 1;   /* rounded down: one wave of blocks, not one and a bit */
    int pps = (pages + want - 1) / want, least = p.kbits < 16 || use_tensor_cores(p) ? ATT_LEAST_PAGES : 2;
    /* several splits: each a whole number of least splits, so that a split's 16-token chunks
     * come out even over a block's warps (H200, fp16 under a 1 GiB pool: 22-page splits
     * 35,161 tok/s, 24-page ones 37,252) */
    if (pps < pages) pps = (pps + least - 1) / least * least;
    const char *e = getenv("LEANKV_SPLIT_PAGES");   /* to measure another length: same bounds */
    static int warned = 0;
    if (e && *e && atoi(e) > 0) pps = atoi(e);
    else if (e && *e && !warned++)
        fprintf(stderr, "leankv: warning: LEANKV_SPLIT_PAGES=%s is not a positive number; "
                        "the engine's own split is kept\n", e);
    if (pps > 4096) pps = 4096;
    return pps < least ? least : pps;
}

/* The slots that can decode at once, for split_pages: all of them, unless a one-tier pool
 * holds fewer sequences at the full context (a tight --kv-mem), where splits sized for every
 * slot busy leave most multiprocessors idle (H200: fp16 under a 1 GiB pool, 28 sequences in
 * flight of 512 slots, 29,128 tok/s with one split a head, 37,289 with the six this count
 * gives, of 24 pages).
 * Two tiers keep every slot: their one-block path needs one split a tier, and a compressed
 * sequence holds fewer pages than this count says. So the split, and a request's arithmetic,
 * follow --kv-mem as well as --batch and --ctx, never the batch of the moment. */
static int busy_slots(const GpuEngine *g, int max_slots, int n_tiers, int head_pages) {
    if (n_tiers > 1) return max_slots;
    long per_seq = (long)g->c.n_layers * g->c.n_kv_heads * head_pages;
    long fit = g->kv.tg[0].n_pages / per_seq;
    return fit < 1 ? 1 : fit < max_slots ? (int)fit : max_slots;
}

/* attention_mma's PAGED chunks read ceil(tpp / 16) * 16 slots of every segment of a page: true
 * when those reads stay inside the page (the segments after them are the page's own) */
static int chunks_in_page(const KvGeom *g, int head_dim) {
    int slots = (g->tpp + 15) / 16 * 16;
    return g->k_codes + slots * lkv_code_bytes(head_dim, g->kbits) <= g->page_bytes &&
           g->k_sz + slots * lkv_sz_bytes(g->groups, g->kbits) <= g->page_bytes &&
           g->v_codes + slots * lkv_code_bytes(head_dim, g->vbits) <= g->page_bytes &&
           g->v_sz + slots * lkv_sz_bytes(g->groups, g->vbits) <= g->page_bytes;
}

extern "C" int gpu_available(char *name, size_t len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(name, len, "%s", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
        cudaGetLastError();   /* clear the sticky error of a failed probe */
        return 0;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) { snprintf(name, len, "no device 0"); return 0; }
    snprintf(name, len, "%s", p.name);
    return 1;
}

extern "C" GpuEngine *gpu_build(const Config *c, const Weights *w, const LkvPrecision *tiers,
                                int n_tiers, LkvPolicy policy, int max_slots, int prefill_chunk,
                                int ctx, size_t kv_mem_mib, char *err, size_t errlen) {
    int G = c->n_heads / c->n_kv_heads;
    if (c->dim > 1024 * RMS_PER_THREAD) {
        snprintf(err, errlen, "the GPU engine serves dim up to %d (this model: %d)",
                 1024 * RMS_PER_THREAD, c->dim);
        return NULL;
    }
    if ((c->head_dim != 64 && c->head_dim != 128) || G < 1 || G > 8) {
        snprintf(err, errlen, "the GPU engine serves head dim 64 or 128 with at most 8 query heads "
                 "per KV head (this model: %d, %d)", c->head_dim, G);
        return NULL;
    }
    if (n_tiers > 1 && (double)(2 * max_slots > prefill_chunk ? 2 * max_slots : prefill_chunk) *
                           c->n_heads * ctx >= 2147483647.0) {
        snprintf(err, errlen, "two tiers keep %d x %d x %d scores per step: too many (lower --batch or --ctx)",
                 max_slots, c->n_heads, ctx);
        return NULL;
    }
    if (n_tiers < 1 || n_tiers > LKV_MAX_TIERS) {
        snprintf(err, errlen, "%d tiers (1 or 2)", n_tiers);
        return NULL;
    }
    for (int t = 0; t < n_tiers; t++) {
        LkvPrecision kv = tiers[t];
        const char *refused = lkv_gpu_refuses(kv, c->head_dim);
        if (refused) {
            snprintf(err, errlen, "k%dv%d, %d group%s: %s", kv.kbits, kv.vbits, kv.groups,
                     kv.groups > 1 ? "s" : "", refused);
            return NULL;
        }
        if (!find_attention(c->head_dim, G, kv, 0)) {   /* served at all? (the kernel: below) */
            snprintf(err, errlen, "no attention kernel for head dim %d, %d query heads per KV head, k%dv%d",
                     c->head_dim, G, kv.kbits, kv.vbits);
            return NULL;
        }
    }
    char name[256];
    if (!gpu_available(name, sizeof name)) {
        snprintf(err, errlen, "no usable CUDA device: %s", name);
        return NULL;
    }
    GpuEngine *g = (GpuEngine *)calloc(1, sizeof(GpuEngine));
    g->c = *c;
    g->max_slots = max_slots;
    g->chunk = prefill_chunk;
    g->ctx = ctx;
    int rows = 1;   /* decode batches are padded to a power of two */
    while (rows < max_slots) rows *= 2;
    g->max_rows = rows > prefill_chunk ? rows : prefill_chunk;
    CUDA_CHECK(cudaDeviceGetAttribute(&g->n_sms, cudaDevAttrMultiProcessorCount, 0));
    CUDA_CHECK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&g->blas));
    CUBLAS_CHECK(cublasSetStream(g->blas, g->stream));
    size_t ws = 32u << 20;
    g->blas_ws = dmalloc(ws);
    CUBLAS_CHECK(cublasSetWorkspace(g->blas, g->blas_ws, ws));

    if (n_tiers > 1 && tiers[0].kbits == 8 && tiers[0].vbits == 4 && tiers[1].kbits == 4 &&
        tiers[1].vbits == 2)   /* leankv's default pair has its own fused launch */
        g->attention_pair = use_tensor_cores(tiers[0]) && use_tensor_cores(tiers[1])
                                ? pair_kernels_tc[c->head_dim == 64 ? 0 : 1]
                                : pair_kernels[c->head_dim == 64 ? 0 : 1][G <= 4 ? G - 1 : 4];
    if (w) build_weights(&g->w, c, w);
    else {   /* the cache-only test engine */
        size_t QD = (size_t)c->n_heads * c->head_dim, KVD = (size_t)c->n_kv_heads * c->head_dim;
        g->test_qkv = (float *)dmalloc((size_t)c->n_layers * g->max_rows * (QD + 2 * KVD) * sizeof(float));
        g->test_o = (__half *)dmalloc((size_t)c->n_layers * g->max_rows * QD * sizeof(__half));
    }
    build_rope_table(g);
    build_kvcache(&g->kv, c, tiers, n_tiers, max_slots, g->max_rows, ctx, kv_mem_mib, g->stream);
    g->kv.defaults = policy;
    if (g->attention_pair && !chunks_in_page(&g->kv.tg[1], c->head_dim))
        g->attention_pair = NULL;   /* (no layout of lkv_layout's gets here) */
    int head_pages = lkv_pages_for(ctx, g->kv.tg[0].tpp);   /* a head at the full context */
    g->pages_per_split = split_pages(head_pages, g->n_sms,
                                     busy_slots(g, max_slots, n_tiers, head_pages), c->n_kv_heads,
                                     tiers[0]);
    for (int t = 0; t < n_tiers; t++)   /* the kernel for this engine's split length */
        g->attention_t[t] = find_attention(c->head_dim, G, tiers[t],
                                           g->pages_per_split * g->kv.tg[t].tpp);
    g->max_splits = 0;
    for (int t = 0; t < n_tiers; t++) {
        int pt = lkv_pages_for(ctx, g->kv.tg[t].tpp);
        g->splits_t[t] = (pt + g->pages_per_split - 1) / g->pages_per_split;
        g->max_splits += g->splits_t[t];
    }
    g->pair_blocks = 2;
    if (g->attention_pair == pair_kernels_tc[0] || g->attention_pair == pair_kernels_tc[1])
        g->pair_blocks = 1;
    g->own_heads = one_block_heads(g);
    g->scores_sm_bytes = keep_bytes(g);
    if (g->pair_blocks == 1) {
        if (c->head_dim == 64) tiers_smem_setup<64>(g->pages_per_split, g->scores_sm_bytes);
        else tiers_smem_setup<128>(g->pages_per_split, g->scores_sm_bytes);
    }
    g->attention_prefill = find_prefill(c->head_dim, G, tiers[0], g->kv.tg[0].width);
    if (n_tiers > 1) {   /* placement stages a tile of high-tier tokens in shared memory */
        KvGeom *h = &g->kv.tg[0];
        int words = (lkv_code_bytes(c->head_dim, h->kbits) + lkv_sz_bytes(h->groups, h->kbits) +
                     lkv_code_bytes(c->head_dim, h->vbits) + lkv_sz_bytes(h->groups, h->vbits)) / 4 + 2;
        g->place_smem = PLACE_THREADS * words * 4 + h->width * 4 + ctx;
        CUDA_CHECK(cudaFuncSetAttribute(kv_place_head, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        g->place_smem));
    }
    g->pdl = env_switch("LEANKV_PDL", 1);
    g->matvec = env_switch("LEANKV_MATVEC", 1) && max_slots <= MATVEC_ROWS && w &&
                c->dim % 8 == 0 && c->hidden_dim % 8 == 0 &&
                c->dim <= 256 * MATVEC_CHUNKS && c->hidden_dim <= 256 * MATVEC_CHUNKS &&
                c->n_heads * c->head_dim <= 256 * MATVEC_CHUNKS;
    g->profile_step = getenv("LEANKV_PROFILE_STEP") ? atoi(getenv("LEANKV_PROFILE_STEP")) : -1;
    build_runstate(&g->s, c, g->max_rows, g->max_splits);
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    KvGeom *kg = &g->kv.tg[0];
    fprintf(stderr, "leankv: GPU %s: KV pool %.0f MiB, %d pages of %d bytes", name,
            (double)kg->n_pages * kg->page_bytes / (1 << 20), kg->n_pages, kg->page_bytes);
    for (int t = 0; t < n_tiers; t++)
        fprintf(stderr, "%s%d tokens at k%dv%d, %d group%s, waste %.1f%%", t ? "; " : " (",
                g->kv.tg[t].tpp, tiers[t].kbits, tiers[t].vbits, tiers[t].groups,
                tiers[t].groups > 1 ? "s" : "",
                100.0 * (kg->page_bytes - g->kv.layouts[t].used) / kg->page_bytes);
    fprintf(stderr, "); %d slots of up to %d tokens; attention splits of %d pages; decode "
                    "projections by %s\n", max_slots, ctx, g->pages_per_split,
            g->matvec ? "matvec" : "cuBLAS");
    return g;
}

extern "C" void gpu_free(GpuEngine *g) {
    if (!g) return;
    for (int i = 0; i < MAX_BUCKETS; i++) if (g->graph[i]) cudaGraphExecDestroy(g->graph[i]);
    free_kvcache(&g->kv);
    free_runstate(&g->s);
    if (g->w.layers) free_weights(&g->w, &g->c);
    cudaFree(g->test_qkv); cudaFree(g->test_o);
    cudaFree(g->rope_cs);
    cublasDestroy(g->blas);
    cudaFree(g->blas_ws);
    cudaStreamDestroy(g->stream);
    free(g);
}

/* pages that appending n_new tokens to slot takes: one tier, by position; two tiers, a prompt
 * (the high pages it reserves, leankv.h 4c) -- a decode step's pages come from gpu_plan */
extern "C" int gpu_pages_needed(const GpuEngine *g, int slot, int n_new) {
    const KVCache *kv = &g->kv;
    if (kv->n_tiers < 2) return pages_opened(g, kv->slot_len[slot], n_new);
    int heads = g->c.n_layers * g->c.n_kv_heads, tpp = kv->tg[0].tpp;
    int have = kv->slot_len[slot] ? lkv_prefill_pages(kv->slot_len[slot], tpp) : 0;
    int need = lkv_prefill_pages(kv->slot_len[slot] + n_new, tpp) - have;
    return need > 0 ? need * heads : 0;
}

extern "C" int gpu_slot_len(const GpuEngine *g, int slot) { return g->kv.slot_len[slot]; }

extern "C" void gpu_info(const GpuEngine *g, GpuInfo *info) {
    info->n_pages = g->kv.tg[0].n_pages;
    info->free_pages = g->kv.free_count;
    info->page_bytes = g->kv.tg[0].page_bytes;
    info->tokens_per_page = g->kv.tg[0].tpp;
    info->max_slots = g->max_slots;
    info->max_rows = g->max_rows;
    info->ctx = g->ctx;
    info->table_width = g->kv.tg[0].width;
}

/* a two-tier cache: slot starts a prompt of n_prompt tokens with these alphas (kv_begin) */
extern "C" void gpu_begin(GpuEngine *g, int slot, int n_prompt, float alpha_high,
                          float alpha_low) {
    KVCache *kv = &g->kv;
    if (kv->n_tiers < 2) return;
    LkvPolicy p = kv->defaults;
    p.alpha_high = alpha_high;
    p.alpha_low = alpha_low;
    p.first = lkv_score_first(n_prompt);
    kv->h_policy[slot] = p;
    CUDA_CHECK(cudaMemcpyAsync(kv->policy + slot, kv->h_policy + slot, sizeof p,
                               cudaMemcpyHostToDevice, g->stream));
    /* the prompt's part of every (layer, query head) row of sums, as the CPU clears it */
    CUDA_CHECK(cudaMemset2DAsync(kv->pscore, g->ctx * sizeof(float), 0, n_prompt * sizeof(float),
                                 (size_t)g->c.n_layers * g->c.n_heads, g->stream));
    kv->placed[slot] = 0;
}

extern "C" int gpu_prefill(GpuEngine *g, int slot, const int *tokens, int n, int *next,
                           float *logits) {
    KVCache *kv = &g->kv;
    cudaStream_t st = g->stream;
    int len = kv->slot_len[slot], V = g->c.vocab_size;
    if (n <= 0) return 0;
    if (len + n > g->ctx) return -2;
    if (kv->n_tiers > 1 && kv->placed[slot]) return -3;   /* tokens have moved: no more prompt */
    int need = gpu_pages_needed(g, slot, n);
    if (need > kv->free_count) return -1;     /* all or nothing, as the CPU's kv_reserve */
    RunState *s = &g->s;
    int R = g->max_rows;
    g->prefill_slot = slot;
    if (kv->n_tiers > 1 && need > 0) {   /* every head: the prompt's high pages (+1) at once */
        int heads = g->c.n_layers * g->c.n_kv_heads;
        kv_prepare_reserve<<<(heads + 255) / 256, 256, 0, st>>>(
            kv->want, kv->n_pg, slot, heads, lkv_prefill_pages(len + n, kv->tg[0].tpp));
        LAUNCH_CHECK();
        kv_apply(g, 1);
    }
    for (int done = 0; done < n; done += g->chunk) {
        int cnt = n - done < g->chunk ? n - done : g->chunk, last = done + cnt == n;
        int n_out = logits ? cnt : last;      /* all rows' logits, or the final row's only */
        for (int i = 0; i < cnt; i++) {
            s->h_rows[i] = slot;
            s->h_rows[R + i] = tokens[done + i];
            s->h_rows[2 * R + i] = len + done + i;
            s->h_rows[3 * R + i] = logits ? i : cnt - 1;
        }
        /* the four arrays are copied as one block; the unused tails are never read */
        CUDA_CHECK(cudaMemcpyAsync(s->rows, s->h_rows, 4 * (size_t)R * sizeof(int),
                                   cudaMemcpyHostToDevice, st));
        if (kv->n_tiers < 2) reserve(g, cnt);
        forward(g, cnt, n_out, len + done + cnt, 0);
        if (logits && g->w.layers)
            CUDA_CHECK(cudaMemcpyAsync(logits + (size_t)done * V, s->logits,
                                       (size_t)cnt * V * sizeof(float), cudaMemcpyDeviceToHost,
                                       st));
        if (last)
            CUDA_CHECK(cudaMemcpyAsync(s->h_next, s->next + n_out - 1, sizeof(int),
                                       cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));   /* h_rows is reused by the next chunk */
    }
    if (next) *next = s->h_next[0];
    kv->slot_len[slot] = len + n;
    kv->free_count -= need;
    return 0;
}

/* a two-tier cache, after the whole prompt of slot is in: placement of every head (one block
 * each), then one give of the spare pages of all heads (kv_place) */
extern "C" void gpu_place(GpuEngine *g, int slot) {
    KVCache *kv = &g->kv;
    Config *c = &g->c;
    if (kv->n_tiers < 2 || kv->placed[slot] || kv->slot_len[slot] == 0) return;
    kv_place_head<<<dim3(c->n_kv_heads, c->n_layers), PLACE_THREADS, g->place_smem, g->stream>>>(
        kv->pool, kv->table, kv->tg[0], kv->tg[1], kv->n_tok, kv->n_pg, kv->want, kv->pscore,
        kv->stage, kv->policy, slot, kv->slot_len[slot], c->n_heads, c->n_heads / c->n_kv_heads,
        c->head_dim, g->ctx);
    LAUNCH_CHECK();
    kv->free_count = kv_apply(g, 0);
    kv->placed[slot] = 1;
}

/* Two tiers: decides every head's case for the next decode step of n slots (kv_plan_step) and
 * gives each slot's pages in need[i]: the one read-back of a step. One tier: by position. */
extern "C" void gpu_plan(GpuEngine *g, int n, const int *slots, int *need) {
    KVCache *kv = &g->kv;
    RunState *s = &g->s;
    if (kv->n_tiers < 2) {
        for (int i = 0; i < n; i++) need[i] = pages_opened(g, kv->slot_len[slots[i]], 1);
        return;
    }
    int R = g->max_rows;
    for (int i = 0; i < n; i++) {
        s->h_rows[i] = slots[i];
        s->h_rows[2 * R + i] = kv->slot_len[slots[i]];
    }
    CUDA_CHECK(cudaMemcpyAsync(s->rows, s->h_rows, 4 * (size_t)R * sizeof(int),
                               cudaMemcpyHostToDevice, g->stream));
    int profile = g->steps == g->profile_step;   /* the plan belongs to the profiled step */
    if (profile) {
        CUDA_CHECK(cudaStreamSynchronize(g->stream));
        CUDA_CHECK(cudaProfilerStart());
    }
    CUDA_CHECK(cudaMemsetAsync(kv->row_need, 0, n * sizeof(int), g->stream));
    kv_plan_step<<<dim3(g->c.n_layers * g->c.n_kv_heads, n), PLAN_THREADS, 0, g->stream>>>(
        kv->plan, kv->row_need, kv->pool, kv->table, kv->tg[0], kv->tg[1], kv->n_tok, kv->n_pg,
        kv->policy, s->row_slot, s->row_pos);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpyAsync(kv->h_need, kv->row_need, n * sizeof(int), cudaMemcpyDeviceToHost,
                               g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    if (profile) CUDA_CHECK(cudaProfilerStop());
    for (int i = 0; i < n; i++) need[i] = kv->slot_need[slots[i]] = kv->h_need[i];
}

extern "C" int gpu_decode(GpuEngine *g, int n, const int *slots, const int *tokens, int *next,
                          float *logits) {
    KVCache *kv = &g->kv;
    cudaStream_t st = g->stream;
    RunState *s = &g->s;
    if (n <= 0) return 0;
    if (n > g->max_slots) return -2;
    int need = 0;
    for (int i = 0; i < n; i++) {
        if (kv->slot_len[slots[i]] >= g->ctx) return -2;
        if (kv->n_tiers > 1) {
            if (kv->slot_need[slots[i]] < 0 || !kv->placed[slots[i]]) return -3;   /* unplanned */
            need += kv->slot_need[slots[i]];
        } else need += pages_opened(g, kv->slot_len[slots[i]], 1);
    }
    if (need > kv->free_count) return -1;
    int bucket = 0, rows = 1;                 /* the graph for the next power of two */
    while (rows < n) { rows *= 2; bucket++; }
    int R = g->max_rows;
    for (int i = 0; i < rows; i++) {          /* padding rows: position -1, skipped everywhere */
        s->h_rows[i] = i < n ? slots[i] : 0;
        s->h_rows[R + i] = i < n ? tokens[i] : 0;
        s->h_rows[2 * R + i] = i < n ? kv->slot_len[slots[i]] : -1;
        s->h_rows[3 * R + i] = i;
    }
    CUDA_CHECK(cudaMemcpyAsync(s->rows, s->h_rows, 4 * (size_t)R * sizeof(int),
                               cudaMemcpyHostToDevice, st));
    if (g->steps++ == g->profile_step) {   /* one step's kernels, one by one, for ncu */
        CUDA_CHECK(cudaStreamSynchronize(st));
        CUDA_CHECK(cudaProfilerStart());
        decode_step(g, rows);
        CUDA_CHECK(cudaStreamSynchronize(st));
        CUDA_CHECK(cudaProfilerStop());
    } else {
        if (!g->graph[bucket]) {   /* capture: reserve + forward with every row's logits */
            cudaGraph_t graph;
            CUDA_CHECK(cudaStreamSynchronize(st));
            CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
            decode_step(g, rows);
            CUDA_CHECK(cudaStreamEndCapture(st, &graph));
            CUDA_CHECK(cudaGraphInstantiate(&g->graph[bucket], graph, 0));
            CUDA_CHECK(cudaGraphDestroy(graph));
        }
        CUDA_CHECK(cudaGraphLaunch(g->graph[bucket], st));
    }
    CUDA_CHECK(cudaMemcpyAsync(s->h_next, s->next, n * sizeof(int), cudaMemcpyDeviceToHost,
                               st));
    if (logits && g->w.layers)
        CUDA_CHECK(cudaMemcpyAsync(logits, s->logits, (size_t)n * g->c.vocab_size * sizeof(float),
                                   cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    for (int i = 0; i < n; i++) {
        next[i] = s->h_next[i];
        kv->slot_len[slots[i]]++;
        if (kv->n_tiers > 1) kv->slot_need[slots[i]] = -1;
    }
    kv->free_count -= need;
    return 0;
}

extern "C" void gpu_release(GpuEngine *g, int slot) {
    KVCache *kv = &g->kv;
    cudaStream_t st = g->stream;
    if (kv->n_tiers > 1) {   /* every page of every head of slot, in one give */
        int heads = g->c.n_layers * g->c.n_kv_heads;
        kv_prepare_release<<<(heads + 255) / 256, 256, 0, st>>>(kv->want, kv->n_pg, kv->n_tok,
                                                                kv->plan, slot, heads);
        LAUNCH_CHECK();
        kv->free_count = kv_apply(g, 0);
        kv->slot_len[slot] = 0;
        kv->placed[slot] = 0;
        kv->slot_need[slot] = -1;
        return;
    }
    int tpp = kv->tg[0].tpp, n_pg = lkv_pages_for(kv->slot_len[slot], tpp);
    if (n_pg == 0) return;
    kv_release<<<1, 1024, 0, st>>>(kv->free_ids, kv->ring, kv->table, slot, n_pg, kv->tg[0]);
    LAUNCH_CHECK();
    kv->free_count += n_pg * g->c.n_layers * g->c.n_kv_heads;
    kv->slot_len[slot] = 0;
}

/* ---- The swap space (leankv.h 4d): pinned host pages that a preempted slot is parked in */

extern "C" int gpu_build_swap(GpuEngine *g, size_t mib, char *err, size_t errlen) {
    KVCache *kv = &g->kv;
    int page_bytes = kv->tg[0].page_bytes, n = lkv_swap_count(mib, page_bytes);
    uint8_t *pages;
    if (n == 0) return 0;
    if (cudaHostAlloc((void **)&pages, (size_t)n * page_bytes, cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();   /* not sticky: cleared, so that no later check reports it */
        snprintf(err, errlen, "cannot pin %zu MiB of host memory for --swap-mem", mib);
        return -1;
    }
    if (lkv_swap_init(&kv->swap, pages, n) != 0) {
        cudaFreeHost(pages);
        snprintf(err, errlen, "out of host memory for the free list of --swap-mem's %d pages", n);
        return -1;
    }
    CUDA_CHECK(cudaHostGetDevicePointer((void **)&kv->swap_dev, pages, 0));
    size_t most = (size_t)g->c.n_layers * g->c.n_kv_heads * kv->tg[0].width;
    CUDA_CHECK(cudaMalloc(&kv->swap_list, 2 * most * sizeof(int)));
    CUDA_CHECK(cudaMallocHost(&kv->h_swap_list, 2 * most * sizeof(int)));
    return 0;
}

/* The table entry of each page that s holds, in its order (per head, high pages then low),
 * and the swap page it goes to, uploaded into swap_list: [entries (n) | swap pages (n)] */
static void swap_list(GpuEngine *g, int slot, const LkvSwapped *s) {
    KVCache *kv = &g->kv;
    int heads = g->c.n_layers * g->c.n_kv_heads, W = kv->tg[0].width, n = s->n_pages;
    for (int a = 0, i = 0; a < heads; a++)
        for (int t = 0; t < LKV_MAX_TIERS; t++)
            for (int k = 0; k < s->n_pg[a * LKV_MAX_TIERS + t]; k++, i++) {
                kv->h_swap_list[i] = ((slot * heads + a) * W) + (t ? W - 1 - k : k);
                kv->h_swap_list[n + i] = s->pages[i];
            }
    CUDA_CHECK(cudaMemcpyAsync(kv->swap_list, kv->h_swap_list, 2 * (size_t)n * sizeof(int),
                               cudaMemcpyHostToDevice, g->stream));
}

extern "C" int gpu_swap_out(GpuEngine *g, int slot, LkvSwapped *s) {
    KVCache *kv = &g->kv;
    int heads = g->c.n_layers * g->c.n_kv_heads, T = LKV_MAX_TIERS, n = 0;
    if (kv->swap.n_pages == 0) return -1;
    int *n_tok = (int *)malloc((size_t)heads * T * sizeof(int));
    int *n_pg = (int *)malloc((size_t)heads * T * sizeof(int));
    if (kv->n_tiers > 1) {   /* each head's counts live on the GPU */
        CUDA_CHECK(cudaMemcpyAsync(n_tok, kv->n_tok + (size_t)slot * heads * T,
                                   heads * T * sizeof(int), cudaMemcpyDeviceToHost, g->stream));
        CUDA_CHECK(cudaMemcpyAsync(n_pg, kv->n_pg + (size_t)slot * heads * T,
                                   heads * T * sizeof(int), cudaMemcpyDeviceToHost, g->stream));
        CUDA_CHECK(cudaStreamSynchronize(g->stream));
    } else {                 /* one tier: by arithmetic, every head alike */
        int len = kv->slot_len[slot];
        for (int a = 0; a < heads; a++) {
            n_tok[a * T] = len; n_pg[a * T] = lkv_pages_for(len, kv->tg[0].tpp);
            n_tok[a * T + 1] = n_pg[a * T + 1] = 0;
        }
    }
    for (int i = 0; i < heads * T; i++) n += n_pg[i];
    if (lkv_swap_take(&kv->swap, n, s) != 0) { free(n_tok); free(n_pg); return -1; }
    s->n_tok = n_tok;
    s->n_pg = n_pg;
    s->len = kv->slot_len[slot];
    if (kv->n_tiers > 1) s->policy = kv->h_policy[slot];
    swap_list(g, slot, s);
    kv_swap_out<<<n, 256, 0, g->stream>>>(kv->swap_dev, kv->swap_list, kv->swap_list + n,
                                          kv->pool, kv->table, kv->tg[0].page_bytes);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaStreamSynchronize(g->stream));   /* before h_swap_list is written again */
    return 0;
}

extern "C" int gpu_swap_in(GpuEngine *g, int slot, LkvSwapped *s) {
    KVCache *kv = &g->kv;
    int heads = g->c.n_layers * g->c.n_kv_heads, T = LKV_MAX_TIERS, n = s->n_pages;
    if (n > kv->free_count) return -1;
    if (kv->n_tiers > 1) {   /* the manager's take, with want = the pages each head had */
        int *h = kv->h_swap_list;
        memcpy(h, s->n_pg, heads * T * sizeof(int));
        memcpy(h + heads * T, s->n_tok, heads * T * sizeof(int));
        CUDA_CHECK(cudaMemcpyAsync(kv->want + (size_t)slot * heads * T, h, heads * T * sizeof(int),
                                   cudaMemcpyHostToDevice, g->stream));
        CUDA_CHECK(cudaMemcpyAsync(kv->n_tok + (size_t)slot * heads * T, h + heads * T,
                                   heads * T * sizeof(int), cudaMemcpyHostToDevice, g->stream));
        kv_apply(g, 1);
        kv->h_policy[slot] = s->policy;
        CUDA_CHECK(cudaMemcpyAsync(kv->policy + slot, kv->h_policy + slot, sizeof(LkvPolicy),
                                   cudaMemcpyHostToDevice, g->stream));
        CUDA_CHECK(cudaStreamSynchronize(g->stream));   /* before h_swap_list is written again */
        kv->placed[slot] = 1;
        kv->slot_need[slot] = -1;
    } else {
        kv_take_run<<<1, 1024, 0, g->stream>>>(kv->table, kv->free_ids, kv->ring, slot, s->n_pg[0],
                                               kv->tg[0]);
        LAUNCH_CHECK();
    }
    kv->free_count -= n;
    swap_list(g, slot, s);
    kv_swap_in<<<n, 256, 0, g->stream>>>(kv->pool, kv->table, kv->swap_list, kv->swap_list + n,
                                         kv->swap_dev, kv->tg[0].page_bytes);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaStreamSynchronize(g->stream));   /* the host pages are read: give them back */
    kv->slot_len[slot] = s->len;
    lkv_swap_give(&kv->swap, s);
    return 0;
}

/* what a two-tier slot holds now, per (layer, KV head): tokens high, tokens low, pages high,
 * pages low -- for the closing report, --kv-map and the tests */
extern "C" void gpu_tier_counts(GpuEngine *g, int slot, int *counts) {
    KVCache *kv = &g->kv;
    int heads = g->c.n_layers * g->c.n_kv_heads;
    if (kv->n_tiers < 2) { memset(counts, 0, (size_t)heads * 4 * sizeof(int)); return; }
    int *tmp = (int *)malloc((size_t)heads * 4 * sizeof(int));
    CUDA_CHECK(cudaMemcpyAsync(tmp, kv->n_tok + (size_t)slot * heads * 2, heads * 2 * sizeof(int),
                               cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaMemcpyAsync(tmp + heads * 2, kv->n_pg + (size_t)slot * heads * 2,
                               heads * 2 * sizeof(int), cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    for (int h = 0; h < heads; h++) {
        counts[h * 4] = tmp[h * 2]; counts[h * 4 + 1] = tmp[h * 2 + 1];
        counts[h * 4 + 2] = tmp[heads * 2 + h * 2]; counts[h * 4 + 3] = tmp[heads * 2 + h * 2 + 1];
    }
    free(tmp);
}

extern "C" double gpu_copy_bandwidth(void) {
    size_t bytes = 1u << 30;
    void *a = dmalloc(bytes), *b = dmalloc(bytes);
    CUDA_CHECK(cudaMemset(a, 1, bytes));
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));   /* warm-up */
    int iters = 10;
    CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < iters; i++)
        CUDA_CHECK(cudaMemcpy(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    cudaEventDestroy(e0); cudaEventDestroy(e1); cudaFree(a); cudaFree(b);
    return 2.0 * bytes * iters / (ms * 1e-3) / 1e9;
}

/* ----------------------------------------------------------------------------------------
 * For the tests (tests/test_gpu_quant.c): the device's write path and attention kernel on
 * pages the caller gives, so that the CPU's kv_store and attention_paged can be held against
 * them byte for byte and value for value. */

/* kv_append_image<HD, bits> for a bits known at run time */
template <int HD>
__device__ void kv_append_image_any(uint32_t *img, uint32_t *img_sz, uint8_t *pool,
                                    const int *table, const KvGeom &g, int pos, int is_v,
                                    const float *x, int lane) {
    switch (is_v ? g.vbits : g.kbits) {
    case 16: kv_append_image<HD, 16>(img, img_sz, pool, table, g, 0, pos, is_v, x, lane); break;
    case 8: kv_append_image<HD, 8>(img, img_sz, pool, table, g, 0, pos, is_v, x, lane); break;
    case 4: kv_append_image<HD, 4>(img, img_sz, pool, table, g, 0, pos, is_v, x, lane); break;
    case 2: kv_append_image<HD, 2>(img, img_sz, pool, table, g, 0, pos, is_v, x, lane); break;
    }
}

/* one block per token: warp 0 stores the key, warp 1 the value, through kv_append (path 0:
 * what prompts use) or kv_append_image (path 1: a decode step's new token; one group, head
 * dim 64 or 128) */
__global__ void kv_store_test(uint8_t *pool, const int *table, KvGeom g, const float *k,
                              const float *v, int head_dim, int path) {
    constexpr int CW = 128 * 16 / 32;   /* code words of the widest vector; its sz word after */
    __shared__ __align__(16) uint32_t img[2][CW + 1];
    int pos = blockIdx.x, is_v = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float *x = (is_v ? v : k) + (size_t)pos * head_dim;
    if (path == 0) kv_append(pool, table, g, 0, pos, is_v, x, head_dim, lane);
    else if (head_dim == 64)
        kv_append_image_any<64>(img[is_v], img[is_v] + CW, pool, table, g, pos, is_v, x, lane);
    else kv_append_image_any<128>(img[is_v], img[is_v] + CW, pool, table, g, pos, is_v, x, lane);
}

static KvGeom test_geom(LkvPrecision p, int head_dim, int n_tok, LkvPageLayout *L) {
    KvGeom g;
    memset(&g, 0, sizeof g);
    g.page_bytes = lkv_page_bytes(&p, 1, head_dim, NULL);
    lkv_layout_fit(L, p, head_dim, g.page_bytes, 0);
    g.n_layers = 1; g.n_kv_heads = 1; g.tpp = L->tokens;
    g.width = lkv_pages_for(n_tok, g.tpp);
    g.k_codes = L->k_codes; g.k_sz = L->k_sz; g.v_codes = L->v_codes; g.v_sz = L->v_sz;
    g.scores = L->scores; g.pos = L->pos;
    g.kbits = p.kbits; g.vbits = p.vbits; g.groups = p.groups;
    g.n_pages = g.width;
    return g;
}

/* Writes n_tok tokens (k, v: (n_tok, head_dim) fp32) into ceil(n_tok / tpp) pages, page i
 * holding tokens i*tpp .., and copies them to pages (the pool bytes): path 0 through the
 * prompt's write path (kv_append), path 1 through a decode step's (kv_append_image). Returns 0,
 * or -1 when the GPU or this shape or path is not served. */
extern "C" int gpu_test_store(LkvPrecision p, int head_dim, int n_tok, const float *k,
                              const float *v, uint8_t *pages, int path) {
    char name[256];
    if (!gpu_available(name, sizeof name) || head_dim % 32) return -1;
    if (path && (p.groups != 1 || (head_dim != 64 && head_dim != 128))) return -1;
    LkvPageLayout L;
    KvGeom g = test_geom(p, head_dim, n_tok, &L);
    size_t bytes = (size_t)g.n_pages * g.page_bytes, vec = (size_t)n_tok * head_dim * sizeof(float);
    uint8_t *pool = (uint8_t *)dmalloc(bytes);
    int *table = (int *)dmalloc(g.width * sizeof(int)), *ids = (int *)malloc(g.width * sizeof(int));
    float *dk = (float *)dmalloc(vec), *dv = (float *)dmalloc(vec);
    for (int i = 0; i < g.width; i++) ids[i] = i;
    CUDA_CHECK(cudaMemset(pool, 0, bytes));
    CUDA_CHECK(cudaMemcpy(table, ids, g.width * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dk, k, vec, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dv, v, vec, cudaMemcpyHostToDevice));
    kv_store_test<<<n_tok, 64>>>(pool, table, g, dk, dv, head_dim, path);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(pages, pool, bytes, cudaMemcpyDeviceToHost));
    cudaFree(pool); cudaFree(table); cudaFree(dk); cudaFree(dv); free(ids);
    return 0;
}

/* attention_paged for one row and one KV head with gq query heads (q: (gq, head_dim), already
 * rotated) over the n_tok tokens of pages (as gpu_test_store lays them out), in splits of
 * pages_per_split pages; o gets (gq, head_dim). Returns 0, or -1 when not served. */
extern "C" int gpu_test_attention(LkvPrecision p, int head_dim, int gq, int n_tok,
                                  const uint8_t *pages, const float *q, int pages_per_split,
                                  int n_rows, float *o) {
    char name[256];
    if (!gpu_available(name, sizeof name)) return -1;
    if (pages_per_split < 1 || n_rows < 0 || n_rows > n_tok) return -1;
    LkvPageLayout L;
    GpuEngine e;
    memset(&e, 0, sizeof e);
    e.kv.tg[0] = test_geom(p, head_dim, n_tok, &L);
    KvGeom *g = &e.kv.tg[0];
    AttentionLaunch fn = find_attention(head_dim, gq, p, pages_per_split * g->tpp);
    if (!fn) return -1;
    if (n_rows) {   /* the prompt kernel: rows at positions n_tok - n_rows .. n_tok - 1 */
        e.attention_prefill = find_prefill(head_dim, gq, p, g->width);
        if (!e.attention_prefill) return -1;
    }
    int R = n_rows ? n_rows : 1;
    e.c.n_heads = gq; e.c.n_kv_heads = 1; e.c.head_dim = head_dim;
    e.pages_per_split = pages_per_split;
    DeviceLayer layer;
    memset(&layer, 0, sizeof layer);
    e.w.layers = &layer;
    int splits = (g->n_pages + pages_per_split - 1) / pages_per_split;
    size_t bytes = (size_t)g->n_pages * g->page_bytes, QO = (size_t)R * gq * head_dim;
    int *rows = (int *)calloc(2 * R, sizeof(int)), *ids = (int *)malloc(g->width * sizeof(int));
    for (int r = 0; r < R; r++) rows[R + r] = n_tok - R + r;   /* slot 0, positions */
    for (int i = 0; i < g->width; i++) ids[i] = i;
    float *qr = (float *)malloc(QO * sizeof(float));   /* every row asks the same q */
    for (int r = 0; r < R; r++) memcpy(qr + (size_t)r * gq * head_dim, q, (size_t)gq * head_dim * sizeof(float));
    e.kv.pool = (uint8_t *)dmalloc(bytes);
    e.kv.table = (int *)dmalloc(g->width * sizeof(int));
    e.s.rows = (int *)dmalloc(2 * R * sizeof(int));
    e.s.row_slot = e.s.rows; e.s.row_pos = e.s.rows + R;
    e.s.q = (float *)dmalloc(QO * sizeof(float));
    e.s.o = (__half *)dmalloc(QO * sizeof(__half));
    e.s.att_part = (float *)dmalloc((size_t)gq * splits * (head_dim + 2) * sizeof(float));
    e.s.arrive = (int *)dmalloc(sizeof(int));
    CUDA_CHECK(cudaMemset(e.s.arrive, 0, sizeof(int)));
    CUDA_CHECK(cudaMemcpy(e.kv.pool, pages, bytes, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(e.kv.table, ids, g->width * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(e.s.rows, rows, 2 * R * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(e.s.q, qr, QO * sizeof(float), cudaMemcpyHostToDevice));
    e.attention_t[0] = fn;
    e.stream = 0;
    attention(&e, 0, R, n_tok, 0, NULL, NULL, e.s.o);
    uint16_t *oh = (uint16_t *)malloc(QO * sizeof(uint16_t));
    CUDA_CHECK(cudaMemcpy(oh, e.s.o, QO * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < QO; i++) o[i] = lkv_h2f(oh[i]);
    cudaFree(e.kv.pool); cudaFree(e.kv.table); cudaFree(e.s.rows); cudaFree(e.s.q);
    cudaFree(e.s.o); cudaFree(e.s.att_part); cudaFree(e.s.arrive);
    free(ids); free(oh); free(rows); free(qr);
    return 0;
}

/* The cache-only test engine (gpu_build with no weights): each layer's q, k, v for the next
 * gpu_prefill / gpu_decode rows, qkv (n_layers, n_rows, QD + 2*KVD) as the projections would
 * give them (no RoPE is applied), and the attention output o (n_layers, n_rows, QD) after. */
extern "C" void gpu_test_set_qkv(GpuEngine *g, const float *qkv, int n_rows) {
    size_t ld = (size_t)(g->c.n_heads + 2 * g->c.n_kv_heads) * g->c.head_dim;
    CUDA_CHECK(cudaMemcpy2D(g->test_qkv, g->max_rows * ld * sizeof(float), qkv,
                            n_rows * ld * sizeof(float), n_rows * ld * sizeof(float),
                            g->c.n_layers, cudaMemcpyHostToDevice));
}

extern "C" void gpu_test_get_o(GpuEngine *g, float *o, int n_rows) {
    size_t QD = (size_t)g->c.n_heads * g->c.head_dim, n = (size_t)g->c.n_layers * n_rows * QD;
    uint16_t *h = (uint16_t *)malloc(n * sizeof(uint16_t));
    CUDA_CHECK(cudaMemcpy2D(h, n_rows * QD * 2, g->test_o, g->max_rows * QD * 2, n_rows * QD * 2,
                            g->c.n_layers, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) o[i] = lkv_h2f(h[i]);
    free(h);
}

/* the page tables (n_layers * n_kv_heads, table_width) of slot, and, when pool is not NULL,
 * every page of the pool (n_pages * page_bytes) */
extern "C" void gpu_test_cache(GpuEngine *g, int slot, int *tables, uint8_t *pool) {
    KvGeom *kg = &g->kv.tg[0];
    size_t heads = (size_t)g->c.n_layers * g->c.n_kv_heads;
    CUDA_CHECK(cudaMemcpy(tables, g->kv.table + slot * heads * kg->width,
                          heads * kg->width * sizeof(int), cudaMemcpyDeviceToHost));
    if (pool)
        CUDA_CHECK(cudaMemcpy(pool, g->kv.pool, (size_t)kg->n_pages * kg->page_bytes,
                              cudaMemcpyDeviceToHost));
}

/* ----------------------------------------------------------------------------------------
 * For bench/: attention_paged alone, timed with CUDA events over a synthetic cache. */

/* fills page `blockIdx.x` of a synthetic cache: codes from a hash, fp16 values in [-1, 1),
 * valid scales and zeros, so that every token is a real one */
__global__ void fill_pages(uint8_t *pool, KvGeom g, int head_dim) {
    uint8_t *page = pool + (size_t)blockIdx.x * g.page_bytes;
    for (int t = threadIdx.x; t < g.tpp; t += blockDim.x) {
        uint32_t h = (blockIdx.x * 2654435761u) ^ (t * 40503u);
        for (int is_v = 0; is_v < 2; is_v++) {
            int bits = is_v ? g.vbits : g.kbits, cb = lkv_code_bytes(head_dim, bits);
            uint8_t *codes = page + (is_v ? g.v_codes : g.k_codes) + (size_t)t * cb;
            for (int i = 0; i < cb; i += 2) {
                h = h * 1664525u + 1013904223u;
                uint16_t x = bits == 16 ? (uint16_t)(0x3800u | ((h >> 16) & 0x83FFu)) : (uint16_t)(h >> 16);
                codes[i] = (uint8_t)x; codes[i + 1] = (uint8_t)(x >> 8);
            }
            if (bits < 16) {
                uint16_t *sz = (uint16_t *)(page + (is_v ? g.v_sz : g.k_sz)) + (size_t)t * 2 * g.groups;
                for (int i = 0; i < g.groups; i++) { sz[2 * i] = 0x211Fu; sz[2 * i + 1] = 0xBC00u; }
            }
        }
        if (g.scores >= 0) {
            ((float *)(page + g.scores))[t] = 0.0f;
            ((int *)(page + g.pos))[t] = 0;
        }
    }
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Median milliseconds of one decode attention launch (attention_paged, and attention_combine
 * when split) for batch sequences of ctx tokens, one query row each, over iters launches after
 * warm-up; splits chosen as gpu_build does. *bytes: the K and V bytes (codes, scales, zeros) the
 * launch reads. -1 when the GPU or this shape is not served. */
extern "C" double gpu_bench_attention(LkvPrecision p, int head_dim, int n_heads, int n_kv_heads,
                                      int batch, int ctx, int iters, double *bytes) {
    char name[256];
    if (!gpu_available(name, sizeof name) || lkv_gpu_refuses(p, head_dim)) return -1;
    if (!find_attention(head_dim, n_heads / n_kv_heads, p, 0) || iters < 1) return -1;
    GpuEngine e;
    memset(&e, 0, sizeof e);
    e.c.n_heads = n_heads; e.c.n_kv_heads = n_kv_heads; e.c.head_dim = head_dim; e.c.n_layers = 1;
    CUDA_CHECK(cudaDeviceGetAttribute(&e.n_sms, cudaDevAttrMultiProcessorCount, 0));
    CUDA_CHECK(cudaStreamCreateWithFlags(&e.stream, cudaStreamNonBlocking));
    LkvPageLayout L;
    KvGeom *g = &e.kv.tg[0];
    *g = test_geom(p, head_dim, ctx, &L);
    g->n_kv_heads = n_kv_heads;
    int per_head = g->width;                       /* pages of one (sequence, KV head) */
    g->n_pages = batch * n_kv_heads * per_head;
    e.pages_per_split = split_pages(per_head, e.n_sms, batch, n_kv_heads, p);   /* as gpu_build */
    e.attention_t[0] = find_attention(head_dim, n_heads / n_kv_heads, p, e.pages_per_split * g->tpp);
    int splits = (per_head + e.pages_per_split - 1) / e.pages_per_split;
    DeviceLayer layer;
    memset(&layer, 0, sizeof layer);
    e.w.layers = &layer;
    size_t pool_bytes = (size_t)g->n_pages * g->page_bytes, QD = (size_t)n_heads * head_dim;
    e.kv.pool = (uint8_t *)dmalloc(pool_bytes);
    e.kv.table = (int *)dmalloc((size_t)g->n_pages * sizeof(int));
    int *ids = (int *)malloc((size_t)g->n_pages * sizeof(int)), *rows = (int *)malloc(4 * batch * sizeof(int));
    for (int i = 0; i < g->n_pages; i++) ids[i] = i;
    for (int r = 0; r < batch; r++) { rows[r] = r; rows[batch + r] = 0; rows[2 * batch + r] = ctx - 1; rows[3 * batch + r] = r; }
    float *q = (float *)malloc(batch * QD * sizeof(float));
    for (size_t i = 0; i < batch * QD; i++) q[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    e.s.rows = (int *)dmalloc(4 * batch * sizeof(int));
    e.s.row_slot = e.s.rows; e.s.row_pos = e.s.rows + 2 * batch;
    e.s.q = (float *)dmalloc(batch * QD * sizeof(float));
    e.s.o = (__half *)dmalloc(batch * QD * sizeof(__half));
    e.s.att_part = (float *)dmalloc((size_t)batch * n_heads * splits * (head_dim + 2) * sizeof(float));
    e.s.arrive = (int *)dmalloc((size_t)batch * n_kv_heads * sizeof(int));
    CUDA_CHECK(cudaMemset(e.s.arrive, 0, (size_t)batch * n_kv_heads * sizeof(int)));
    CUDA_CHECK(cudaMemcpy(e.kv.table, ids, (size_t)g->n_pages * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(e.s.rows, rows, 4 * batch * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(e.s.q, q, batch * QD * sizeof(float), cudaMemcpyHostToDevice));
    fill_pages<<<g->n_pages, 64, 0, e.stream>>>(e.kv.pool, *g, head_dim);
    LAUNCH_CHECK();
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    float *ms = (float *)malloc(iters * sizeof(float));
    for (int it = -3; it < iters; it++) {   /* three launches warm up */
        CUDA_CHECK(cudaEventRecord(e0, e.stream));
        attention(&e, 0, batch, ctx, 0, NULL, NULL, e.s.o);
        CUDA_CHECK(cudaEventRecord(e1, e.stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        if (it >= 0) CUDA_CHECK(cudaEventElapsedTime(&ms[it], e0, e1));
    }
    qsort(ms, iters, sizeof(float), cmp_float);
    double med = ms[iters / 2];
    *bytes = (double)batch * n_kv_heads * ctx *
             (lkv_code_bytes(head_dim, p.kbits) + lkv_sz_bytes(p.groups, p.kbits) +
              lkv_code_bytes(head_dim, p.vbits) + lkv_sz_bytes(p.groups, p.vbits));
    cudaEventDestroy(e0); cudaEventDestroy(e1);
    cudaFree(e.kv.pool); cudaFree(e.kv.table); cudaFree(e.s.rows); cudaFree(e.s.q);
    cudaFree(e.s.o); cudaFree(e.s.att_part); cudaFree(e.s.arrive); cudaStreamDestroy(e.stream);
    free(ids); free(rows); free(q); free(ms);
    return med;
}
