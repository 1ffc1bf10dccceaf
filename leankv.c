/* leankv.c: inference for Llama-family models with a paged KV cache, on the CPU.
 *
 * This file is the reference: it loads model.bin (written by export.py) or a llama2.c
 * checkpoint, tokenizes (tokenizer.c), runs the forward pass (a prompt in chunks of rows, then
 * one token at a time) against a paged KV cache laid out as ../shared/LEANKV.md section 5
 * describes, samples, and drives the modes (generate, chat, tokenize, ppl, logits). leankv.cu
 * is the GPU twin.
 *
 * Sections, in the order data flows:
 *   errors | model | KV cache | forward | sampler | modes | command line */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "leankv.h"

/* --kv-map's PNG and its labels (Debian's libstb-dev) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>
#pragma GCC diagnostic pop

/* ----------------------------------------------------------------------------------------
 * Errors: one line on stderr, exit 1. A learner should see what went wrong, not a core dump.
 *
 * A fuzz target (tests/fuzz/, built with -DLKV_FUZZ) cannot let the process exit: there die()
 * keeps the message and jumps back to the target, which frees what the reader had built
 * (every reader keeps its allocations reachable from the struct it fills, so nothing leaks). */

#ifdef LKV_FUZZ
#include <setjmp.h>
static jmp_buf *die_jump;      /* set by a fuzz target around a call that may die */
static char die_message[512];  /* what die() would have printed */
#endif

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...) {
    char msg[1024], line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* one line, whatever the message quotes (a flag's value, a file name): control bytes are
     * written as \xNN */
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)msg; *p && k + 5 < sizeof line; p++) {
        if (*p < 0x20 || *p == 0x7f) k += (size_t)snprintf(line + k, 5, "\\x%02x", *p);
        else line[k++] = (char)*p;
    }
    line[k] = 0;
#ifdef LKV_FUZZ
    if (die_jump) {
        snprintf(die_message, sizeof die_message, "%s", line);
        longjmp(*die_jump, 1);
    }
#endif
    /* _exit, not exit: the process ends here, and what it still holds goes back to the system
     * with it. So LeakSanitizer's check at exit, which would count memory that an optimized
     * build no longer points to from any frame, does not run on this path; the fuzz targets
     * check instead that the readers free everything when they fail. */
    fflush(stdout);
    fprintf(stderr, "leankv: error: %s\n", line);
    _exit(1);
}

static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

/* this machine's memory in bytes (SIZE_MAX when the system does not say) */
static size_t memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page <= 0 || (unsigned long)pages > SIZE_MAX / (unsigned long)page)
        return SIZE_MAX;
    return (size_t)pages * (size_t)page;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ----------------------------------------------------------------------------------------
 * Model: hyperparameters, weights, activations */

#define ATT_LANES 16   /* prompt rows that attention_rows() takes at once: its vector lanes */

/* Activations for up to `chunk` rows (tokens) at once: forward() uses row 0, forward_rows()
 * a prompt chunk of n <= chunk rows, as leankv.cu's RunState holds max_rows. */
typedef struct {
    int chunk;     /* rows per prefill pass (--prefill-chunk): the leading dimension below */
    float *x;      /* (chunk, dim) residual stream */
    float *xb;     /* (chunk, dim) normed input of a block */
    float *xb2;    /* (chunk, dim) block output before the residual add */
    float *q;      /* (chunk, n_heads*head_dim) */
    float *k;      /* (chunk, n_kv_heads*head_dim) */
    float *v;      /* (chunk, n_kv_heads*head_dim) */
    float *att;    /* (n_heads, ctx, ATT_LANES) attention scores of ATT_LANES rows */
    float *o;      /* (chunk, n_heads*head_dim) attention output */
    float *hb;     /* (chunk, hidden_dim) */
    float *hb2;    /* (chunk, hidden_dim) */
    float *logits; /* (chunk, vocab) */
} RunState;

typedef struct {
    Config c;
    Weights w;
    RunState s;
    Tokenizer *tok;   /* NULL when the file has no tokenizer */
    void *map;        /* the mmapped file */
    size_t map_bytes;
    const char *system; /* (system_len) the template's default system message, or NULL */
    int system_len;
    float **owned;    /* fp32 copies made at load (fp16 files), freed with the model */
    int n_owned;
} Model;

/* the file must hold what it claims: every size is checked against the mapping */
static const LkvTensorEntry *find_tensor(const LkvTensorEntry *tt, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strncmp(tt[i].name, name, LKV_TENSOR_NAME_MAX) == 0) return &tt[i];
    return NULL;
}

static float *load_tensor(Model *m, const char *path, const LkvTensorEntry *tt, int n,
                          const char *name, int rows, int cols, int required) {
    const LkvTensorEntry *e = find_tensor(tt, n, name);
    if (!e) {
        if (required) die("%s: tensor '%s' is missing", path, name);
        return NULL;
    }
    int r = e->shape[0], c = e->ndim == 2 ? e->shape[1] : 1;
    if (e->ndim < 1 || e->ndim > 2 || r != rows || c != cols)
        die("%s: tensor '%s' has shape [%d, %d], the header implies [%d, %d]", path, name, r, c,
            rows, cols);
    size_t elt = e->dtype == LKV_DTYPE_F32 ? 4 : e->dtype == LKV_DTYPE_F16 ? 2 : 0;
    if (!elt) die("%s: tensor '%s' has unknown dtype %d", path, name, e->dtype);
    if (e->nbytes != (uint64_t)rows * cols * elt)
        die("%s: tensor '%s' claims %llu bytes for %d x %d values", path, name,
            (unsigned long long)e->nbytes, rows, cols);
    if (e->offset % 64 || e->offset > m->map_bytes || e->nbytes > m->map_bytes - e->offset)
        die("%s: tensor '%s' lies outside the file (offset %llu, %llu bytes, file %zu bytes)",
            path, name, (unsigned long long)e->offset, (unsigned long long)e->nbytes,
            m->map_bytes);
    uint8_t *p = (uint8_t *)m->map + e->offset;
    if (e->dtype == LKV_DTYPE_F32) return (float *)p;
    /* fp16 on disk: the CPU reference computes in fp32, so widen once at load */
    size_t count = (size_t)rows * cols;
    float *f = xmalloc(count * sizeof(float));
    const uint16_t *h = (const uint16_t *)p;
    for (size_t i = 0; i < count; i++) f[i] = lkv_h2f(h[i]);
    m->owned = realloc(m->owned, (m->n_owned + 1) * sizeof(float *));
    if (!m->owned) die("out of memory");
    m->owned[m->n_owned++] = f;
    return f;
}

/* the reason a config cannot be right, or NULL */
static const char *config_problem(const Config *c) {
    static char why[256];
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->head_dim <= 0 || c->vocab_size <= 0 || c->seq_len <= 0)
        snprintf(why, sizeof why, "header has a non-positive dimension (dim %d, hidden %d, "
                 "layers %d, heads %d, kv heads %d, head dim %d, vocab %d, context %d)",
                 c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                 c->vocab_size, c->seq_len);
    else if (c->dim > 65536 || c->hidden_dim > 262144 || c->n_layers > 1024 ||
             c->n_heads > 1024 || c->head_dim > LKV_MAX_HEAD_DIM || c->vocab_size > (1 << 22) ||
             c->seq_len > (1 << 24))
        snprintf(why, sizeof why, "header dimensions are implausibly large");
    else if (c->n_heads % c->n_kv_heads)
        snprintf(why, sizeof why, "%d query heads are not a multiple of %d KV heads",
                 c->n_heads, c->n_kv_heads);
    else if (c->head_dim % 2)
        snprintf(why, sizeof why, "head dim %d is odd; RoPE needs pairs", c->head_dim);
    else if (!(c->norm_eps > 0 && c->norm_eps < 1))
        snprintf(why, sizeof why, "norm eps %g is out of range", c->norm_eps);
    else if (!(c->rope_theta > 1))
        snprintf(why, sizeof why, "rope theta %g is out of range", c->rope_theta);
    else return NULL;
    return why;
}

static void map_file(Model *m, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("'%s' is not a regular file", path);
    if (st.st_size < LKV_LEGACY_HEADER_BYTES)
        die("%s: file is %lld bytes, too short for any model header", path,
            (long long)st.st_size);
    m->map_bytes = (size_t)st.st_size;
    m->map = mmap(NULL, m->map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) die("cannot map '%s': %s", path, strerror(errno));
}

/* activations for contexts of ctx tokens, prompts going in chunk rows at a time */
static void build_runstate(Model *m, int ctx, int chunk) {
    Config *c = &m->c;
    RunState *s = &m->s;
    size_t qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim, rows = chunk;
    s->chunk = chunk;
    s->x = xmalloc(rows * c->dim * sizeof(float));
    s->xb = xmalloc(rows * c->dim * sizeof(float));
    s->xb2 = xmalloc(rows * c->dim * sizeof(float));
    s->q = xmalloc(rows * qd * sizeof(float));
    s->k = xmalloc(rows * kvd * sizeof(float));
    s->v = xmalloc(rows * kvd * sizeof(float));
    s->o = xmalloc(rows * qd * sizeof(float));
    s->att = xmalloc((size_t)c->n_heads * ctx * ATT_LANES * sizeof(float));
    s->hb = xmalloc(rows * c->hidden_dim * sizeof(float));
    s->hb2 = xmalloc(rows * c->hidden_dim * sizeof(float));
    s->logits = xmalloc(rows * c->vocab_size * sizeof(float));
}

static void free_runstate(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->o);
    free(s->att); free(s->hb); free(s->hb2); free(s->logits);
}

typedef struct { uint64_t start, end; } Span;

static int cmp_span(const void *a, const void *b) {
    const Span *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* The tensor table as a whole, before anything is loaded: byte ranges inside the file that do
 * not overlap one another, so that no two tensors share bytes and the fp32 copies of fp16
 * tensors total at most twice the file. Returns the reason it is not so, or NULL. */
static const char *table_problem(const LkvTensorEntry *tt, int n, size_t file_bytes) {
    static char why[256];
    Span *s = malloc((size_t)n * sizeof *s);
    if (!s) return "out of memory checking the tensor table";
    const char *bad = NULL;
    for (int i = 0; i < n && !bad; i++) {
        if (tt[i].offset > file_bytes || tt[i].nbytes > file_bytes - tt[i].offset) {
            snprintf(why, sizeof why, "tensor %d (%.*s) lies outside the file (offset %llu, "
                     "%llu bytes, file %zu bytes)", i, LKV_TENSOR_NAME_MAX, tt[i].name,
                     (unsigned long long)tt[i].offset, (unsigned long long)tt[i].nbytes,
                     file_bytes);
            bad = why;
        }
        s[i].start = tt[i].offset;
        s[i].end = tt[i].offset + tt[i].nbytes;
    }
    if (!bad) {
        qsort(s, (size_t)n, sizeof *s, cmp_span);
        uint64_t reach = 0;   /* the end of the ranges so far */
        for (int i = 0; i < n && !bad; i++) {
            if (s[i].end == s[i].start) continue;   /* empty: shares nothing */
            if (s[i].start < reach) {
                snprintf(why, sizeof why, "two tensors share bytes [%llu, %llu) of the file",
                         (unsigned long long)s[i].start,
                         (unsigned long long)(reach < s[i].end ? reach : s[i].end));
                bad = why;
            }
            if (s[i].end > reach) reach = s[i].end;
        }
    }
    free(s);
    return bad;
}

/* model.bin written by export.py */
static void load_leankv_file(Model *m, const char *path) {
    if (m->map_bytes < LKV_HEADER_BYTES)
        die("%s: file is %zu bytes, shorter than the %d-byte header", path, m->map_bytes,
            LKV_HEADER_BYTES);
    LkvHeader h;
    memcpy(&h, m->map, sizeof h);
    if (h.version != LKV_VERSION)
        die("%s: model.bin version %d, this leankv reads version %d; re-export it", path,
            h.version, LKV_VERSION);
    if (h.file_bytes != m->map_bytes)
        die("%s: file is %zu bytes but its header says %llu (truncated or padded?)", path,
            m->map_bytes, (unsigned long long)h.file_bytes);
    Config *c = &m->c;
    c->dim = h.dim; c->hidden_dim = h.hidden_dim; c->n_layers = h.n_layers;
    c->n_heads = h.n_heads; c->n_kv_heads = h.n_kv_heads; c->head_dim = h.head_dim;
    c->vocab_size = h.vocab_size; c->seq_len = h.seq_len; c->rope_theta = h.rope_theta;
    c->rope_style = h.rope_style; c->norm_eps = h.norm_eps; c->tied = h.tied_classifier;
    c->qkv_bias = h.qkv_bias; c->bos_id = h.bos_id; c->eos_id = h.eos_id;
    c->add_bos = h.add_bos; c->chat_template = h.chat_template; c->n_stop = h.n_stop;
    const char *why = config_problem(c);
    if (why) die("%s: %s", path, why);
    if (c->rope_style != LKV_ROPE_INTERLEAVED && c->rope_style != LKV_ROPE_HALF)
        die("%s: unknown rope style %d", path, c->rope_style);
    if (c->n_stop < 0 || c->n_stop > LKV_MAX_STOP) die("%s: %d stop ids (max %d)", path,
                                                       c->n_stop, LKV_MAX_STOP);
    for (int i = 0; i < c->n_stop; i++) {
        c->stop_ids[i] = h.stop_ids[i];
        if (h.stop_ids[i] < 0 || h.stop_ids[i] >= c->vocab_size)
            die("%s: stop id %d is outside the vocabulary", path, h.stop_ids[i]);
    }
    if (c->bos_id >= c->vocab_size || c->eos_id >= c->vocab_size)
        die("%s: bos/eos id outside the vocabulary", path);
    if (h.n_tensors <= 0 || h.n_tensors > 100000) die("%s: %d tensors in the table", path,
                                                      h.n_tensors);
    uint64_t tt_bytes = (uint64_t)h.n_tensors * sizeof(LkvTensorEntry);
    if (h.tensor_table_offset > m->map_bytes || tt_bytes > m->map_bytes - h.tensor_table_offset)
        die("%s: tensor table lies outside the file", path);
    if (h.tensor_table_offset % 8) die("%s: tensor table is misaligned", path);
    const LkvTensorEntry *tt = (const LkvTensorEntry *)((uint8_t *)m->map + h.tensor_table_offset);
    int n = h.n_tensors;
    const char *bad = table_problem(tt, n, m->map_bytes);
    if (bad) die("%s: %s", path, bad);
    uint64_t widened = 0;   /* bytes of the fp32 copies that fp16 tensors will need */
    for (int i = 0; i < n; i++) if (tt[i].dtype == LKV_DTYPE_F16) widened += 2 * tt[i].nbytes;
    if (widened >= memory_bytes())
        die("%s: its fp16 weights need %llu bytes as fp32, more than this machine's memory "
            "(%zu bytes)", path, (unsigned long long)widened, memory_bytes());

    int D = c->dim, H = c->hidden_dim, QD = c->n_heads * c->head_dim,
        KVD = c->n_kv_heads * c->head_dim;
    Weights *w = &m->w;
    char name[LKV_TENSOR_NAME_MAX];
    w->tok_embeddings = load_tensor(m, path, tt, n, "tok_embeddings", c->vocab_size, D, 1);
    w->layers = xmalloc(c->n_layers * sizeof(LayerWeights));
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
#define LT(field, nm, r, cl, req)                                                 \
    snprintf(name, sizeof name, "layers.%d." nm, l);                              \
    L->field = load_tensor(m, path, tt, n, name, r, cl, req)
        LT(attn_norm, "attn_norm", D, 1, 1);
        LT(wq, "wq", QD, D, 1);
        LT(wk, "wk", KVD, D, 1);
        LT(wv, "wv", KVD, D, 1);
        LT(bq, "bq", QD, 1, c->qkv_bias);
        LT(bk, "bk", KVD, 1, c->qkv_bias);
        LT(bv, "bv", KVD, 1, c->qkv_bias);
        LT(wo, "wo", D, QD, 1);
        LT(ffn_norm, "ffn_norm", D, 1, 1);
        LT(w1, "w1", H, D, 1);
        LT(w2, "w2", D, H, 1);
        LT(w3, "w3", H, D, 1);
#undef LT
        if (!c->qkv_bias) L->bq = L->bk = L->bv = NULL;
    }
    w->norm = load_tensor(m, path, tt, n, "norm", D, 1, 1);
    const LkvTensorEntry *sys = find_tensor(tt, n, "chat.system");
    if (sys) {
        if (sys->dtype != LKV_DTYPE_U8 || sys->ndim != 1 || sys->shape[0] < 0 ||
            sys->nbytes != (uint64_t)sys->shape[0] || sys->offset > m->map_bytes ||
            sys->nbytes > m->map_bytes - sys->offset)
            die("%s: the chat.system entry is malformed", path);
        m->system = (const char *)m->map + sys->offset;
        m->system_len = sys->shape[0];
    }
    w->output = c->tied ? w->tok_embeddings
                        : load_tensor(m, path, tt, n, "output", c->vocab_size, D, 1);

    if (h.tokenizer_bytes) {
        if (h.tokenizer_offset > m->map_bytes || h.tokenizer_bytes > m->map_bytes - h.tokenizer_offset)
            die("%s: tokenizer section lies outside the file", path);
        char err[256];
        if (build_tokenizer(&m->tok, (const uint8_t *)m->map + h.tokenizer_offset,
                            h.tokenizer_bytes, err, sizeof err) != 0)
            die("%s: tokenizer: %s", path, err);
        if (tokenizer_vocab_size(m->tok) != c->vocab_size)
            die("%s: tokenizer has %d tokens, the model %d", path, tokenizer_vocab_size(m->tok),
                c->vocab_size);
    }
}

/* llama2.c's version-0 checkpoint: 7 ints, then fp32 weights; the size must match exactly */
static void load_legacy_file(Model *m, const char *path, const char *tok_path) {
    if (m->map_bytes < LKV_LEGACY_HEADER_BYTES)
        die("%s: file is %zu bytes, too short for a llama2.c header (%d bytes)", path,
            m->map_bytes, LKV_LEGACY_HEADER_BYTES);
    int32_t hd[7];
    memcpy(hd, m->map, sizeof hd);
    Config *c = &m->c;
    c->dim = hd[0]; c->hidden_dim = hd[1]; c->n_layers = hd[2]; c->n_heads = hd[3];
    c->n_kv_heads = hd[4]; c->seq_len = hd[6];
    c->vocab_size = hd[5] == INT_MIN ? 0 : abs(hd[5]);   /* abs(INT_MIN) is undefined */
    c->tied = hd[5] > 0;
    c->head_dim = c->n_heads > 0 ? c->dim / c->n_heads : 0;
    c->rope_theta = 10000.0f; c->rope_style = LKV_ROPE_INTERLEAVED; c->norm_eps = 1e-5f;
    c->qkv_bias = 0; c->bos_id = 1; c->eos_id = 2; c->add_bos = 1;
    c->chat_template = LKV_CHAT_LLAMA2; c->n_stop = 1; c->stop_ids[0] = 2;
    /* without a magic number, only the header's consistency with the file size says that
     * this is a llama2.c checkpoint */
    const char *why = hd[5] == INT_MIN ? "corrupt header" : config_problem(c);
    if (!why && c->n_heads * c->head_dim != c->dim) why = "dim is not a multiple of the heads";
    if (why) die("%s: not a model.bin (magic 0x%08x, expected 0x%08x) and not a llama2.c "
                 "checkpoint (%s)", path, (unsigned)hd[0], LKV_MAGIC, why);
    uint64_t D = c->dim, H = c->hidden_dim, L = c->n_layers, V = c->vocab_size,
             KVD = (uint64_t)c->n_kv_heads * c->head_dim;
    uint64_t floats = V * D + L * (D + D * D + 2 * D * KVD + D * D + D + 3 * D * H) + D +
                      (uint64_t)c->seq_len * c->head_dim;   /* two freq_cis halves */
    if (!c->tied) floats += V * D;
    if (LKV_LEGACY_HEADER_BYTES + floats * 4 != m->map_bytes)
        die("%s: not a model.bin (bad magic) and not a llama2.c checkpoint of the size its "
            "header implies (%llu bytes expected, %zu found)", path,
            (unsigned long long)(LKV_LEGACY_HEADER_BYTES + floats * 4), m->map_bytes);
    float *p = (float *)((uint8_t *)m->map + LKV_LEGACY_HEADER_BYTES);
    Weights *w = &m->w;
    w->layers = xmalloc(c->n_layers * sizeof(LayerWeights));
    w->tok_embeddings = p; p += V * D;
#define LEG(field, per)                                                           \
    for (uint64_t l = 0; l < L; l++) { w->layers[l].field = p; p += (per); }
    LEG(attn_norm, D);
    LEG(wq, D * D);
    LEG(wk, D * KVD);
    LEG(wv, D * KVD);
    LEG(wo, D * D);
    LEG(ffn_norm, D);
    LEG(w1, D * H);
    LEG(w2, H * D);
    LEG(w3, D * H);
#undef LEG
    w->norm = p; p += D;
    p += (uint64_t)c->seq_len * c->head_dim;
    w->output = c->tied ? w->tok_embeddings : p;
    if (!tok_path) die("%s is a llama2.c checkpoint: give its tokenizer.bin with -z", path);
    char err[256];
    if (build_tokenizer_legacy(&m->tok, tok_path, c->vocab_size, err, sizeof err) != 0)
        die("%s: %s", tok_path, err);
}

static void build_model(Model *m, const char *path, const char *tok_path) {
    memset(m, 0, sizeof *m);
    map_file(m, path);
    uint32_t magic;
    memcpy(&magic, m->map, 4);
    if (magic == LKV_MAGIC) {
        load_leankv_file(m, path);
        if (tok_path) {  /* -z overrides the embedded tokenizer */
            if (m->tok) free_tokenizer(m->tok);
            char err[256];
            if (build_tokenizer_legacy(&m->tok, tok_path, m->c.vocab_size, err, sizeof err))
                die("%s: %s", tok_path, err);
        }
    } else {
        load_legacy_file(m, path, tok_path);
    }
}

static void free_model(Model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->w.layers);
    if (m->tok) free_tokenizer(m->tok);
    if (m->map) munmap(m->map, m->map_bytes);   /* NULL: a fuzz target owns the bytes */
}

/* ----------------------------------------------------------------------------------------
 * KV cache: pages in one pool, a page table per (sequence, layer, KV head), and a circular
 * array of free page ids (../shared/LEANKV.md sections 5 and 6).
 *
 * Each (sequence, layer, KV head) -- a "head" below -- owns whole pages: its tokens never
 * share a page with another head, so each head can have its own length and precision. A
 * cache has one tier (every token at one precision: fp16, k8v4, ...) or two ("--kv leankv":
 * high and low, plus pruned tokens that are simply gone). High-tier pages fill a head's table
 * from the left, low-tier pages from the right (leankv.h section 4c).
 *
 * The life of a sequence on a two-tier cache:
 *   kv_begin     its alphas and window; the prompt's scores start at zero
 *   kv_reserve   pages for the prompt (+1 per head, for placement), chunk by chunk
 *   forward_rows the prompt; attention_rows sums each query head's probabilities (pscore)
 *   kv_place     prefill placement: high / low / pruned per head; unused pages go back
 *   then each decode step:
 *   kv_plan_step the decode case of every head (leankv.h 4c), before the step's attention
 *   kv_take_planned  the pages those cases need, all or nothing (several sequences at once)
 *   forward      kv_write_token carries the case out; attention adds the GQA group's max
 *                probability to every cached token's score
 *   kv_account   what it held at the end (for the report and --kv-map), then kv_release. */

typedef struct {
    LkvPrecision tier[LKV_MAX_TIERS]; /* [n_tiers] precision of tier 0 (high), 1 (low) */
    LkvPageLayout layout[LKV_MAX_TIERS]; /* [n_tiers] segment offsets inside a page */
    int n_tiers;         /* 1: one precision, no policy; 2: leankv's high and low tiers */
    int head_dim;
    int group;           /* query heads per KV head (GQA) */
    int ctx;             /* positions a sequence may reach */
    int page_bytes;      /* every page, whatever its tier */
    int n_pages;         /* pages in the pool */
    uint8_t *pool;       /* (n_pages, page_bytes) */
    int *free_ids;       /* (n_pages) circular array of free page ids */
    int free_start;      /* index in free_ids of the first free id */
    int free_count;      /* free pages; they sit at free_start .. free_start+free_count-1 */
    int n_seqs, n_layers, n_kv_heads;
    int n_heads_total;   /* n_seqs * n_layers * n_kv_heads */
    int table_width;     /* page-table entries per head */
    int *table;          /* (n_heads_total, table_width) page ids; high from the left, low
                            from the right */
    int *n_tok;          /* (n_heads_total, LKV_MAX_TIERS) tokens held in each tier */
    int *n_pg;           /* (n_heads_total, LKV_MAX_TIERS) pages held by each tier */
    int *n_seen;         /* (n_heads_total) tokens the head has processed, kept or not */
    /* the memory manager's per-head counts (section 6): zero between operations */
    int *want;           /* (n_heads_total, LKV_MAX_TIERS) pages a head takes or gives */
    int *offset;         /* (n_heads_total, LKV_MAX_TIERS) exclusive prefix sum of want */
    /* the tier policy (two tiers only) */
    LkvPolicy defaults;  /* alphas and window of a sequence whose request names none */
    LkvPolicy *policy;   /* (n_seqs) each sequence's alphas, window and first counted row */
    int *prefilling;     /* (n_seqs) 1 from kv_begin to kv_place */
    int *plan;           /* (n_heads_total, 3) next token's decode case, L and R (4c) */
    float *pscore;       /* (n_layers, group * n_kv_heads, ctx) prompt score sums per query
                            head, of the one sequence in prefill (prompts run one at a time) */
    float *stage;        /* (ctx, 2 * head_dim) placement: low-tier K, V staged in fp32 */
    float *stage_score;  /* (ctx) their scores */
    int *stage_pos;      /* (ctx) their positions */
    uint8_t *stage_tier; /* (ctx) placement: each prompt token's LKV_HIGH / LOW / PRUNED */
    int *tmp_table;      /* (table_width) placement: a head's table before it is rearranged */
    /* what finished sequences held at their end: the report and --kv-map */
    long *acc_high;      /* (n_layers, n_kv_heads) high-tier tokens */
    long *acc_low;       /* (n_layers, n_kv_heads) low-tier tokens */
    long *acc_seen;      /* (n_layers, n_kv_heads) processed tokens */
    long acc_pages;      /* pages held */
    LkvSwapSpace swap;   /* host pages that preempted sequences are parked in (leankv.h 4d) */
} KVCache;

static inline int kv_head(const KVCache *kv, int seq, int layer, int h) {
    return (seq * kv->n_layers + layer) * kv->n_kv_heads + h;
}

/* The cache for n_seqs sequences of ctx tokens, its tiers (1 or 2) given by tiers[]. The pool
 * has kv_mem_mib MiB, or when 0 enough pages for every sequence at full length (a two-tier
 * cache: in the high tier, plus the page each head reserves for placement). */
static void build_kvcache_tiers(KVCache *kv, const Config *c, int n_seqs, int ctx,
                                size_t kv_mem_mib, const LkvPrecision *tiers, int n_tiers) {
    memset(kv, 0, sizeof *kv);
    kv->n_tiers = n_tiers;
    for (int t = 0; t < n_tiers; t++) kv->tier[t] = tiers[t];
    kv->head_dim = c->head_dim;
    kv->group = c->n_heads / c->n_kv_heads;
    kv->ctx = ctx;
    float waste;
    kv->page_bytes = lkv_page_bytes(kv->tier, kv->n_tiers, c->head_dim, &waste);
    for (int t = 0; t < kv->n_tiers; t++)
        if (lkv_layout_fit(&kv->layout[t], kv->tier[t], c->head_dim, kv->page_bytes,
                           n_tiers > 1) < 1)
            die("kv cache: no token of k%dv%d fits a page of %d bytes", kv->tier[t].kbits,
                kv->tier[t].vbits, kv->page_bytes);
    kv->n_seqs = n_seqs; kv->n_layers = c->n_layers; kv->n_kv_heads = c->n_kv_heads;
    kv->n_heads_total = n_seqs * c->n_layers * c->n_kv_heads;
    int tpp = kv->layout[0].tokens;
    kv->table_width = lkv_pages_for(ctx, tpp) + 2;
    size_t want = (size_t)kv->n_heads_total * (lkv_pages_for(ctx, tpp) + (n_tiers > 1));
    size_t n_pages = kv_mem_mib ? (kv_mem_mib << 20) / kv->page_bytes : want;
    if (n_pages < 1) die("--kv-mem %zu MiB holds no page of %d bytes", kv_mem_mib,
                         kv->page_bytes);
    if (n_pages > INT_MAX / 2) n_pages = INT_MAX / 2;
    kv->n_pages = (int)n_pages;
    kv->pool = xmalloc((size_t)kv->n_pages * kv->page_bytes);
    kv->free_ids = xmalloc(kv->n_pages * sizeof(int));
    for (int i = 0; i < kv->n_pages; i++) kv->free_ids[i] = i;
    kv->free_start = 0;
    kv->free_count = kv->n_pages;
    size_t H = kv->n_heads_total;
    kv->table = xmalloc(H * kv->table_width * sizeof(int));
    kv->n_tok = xmalloc(H * LKV_MAX_TIERS * sizeof(int));
    kv->n_pg = xmalloc(H * LKV_MAX_TIERS * sizeof(int));
    kv->n_seen = xmalloc(H * sizeof(int));
    kv->want = xmalloc(H * LKV_MAX_TIERS * sizeof(int));
    kv->offset = xmalloc(H * LKV_MAX_TIERS * sizeof(int));
    kv->plan = xmalloc(H * 3 * sizeof(int));
    kv->defaults = (LkvPolicy){1.0f, 0.02f, 64, 0};
    kv->policy = xmalloc(n_seqs * sizeof(LkvPolicy));
    kv->prefilling = xmalloc(n_seqs * sizeof(int));
    if (n_tiers > 1) {
        kv->pscore = xmalloc((size_t)c->n_layers * c->n_heads * ctx * sizeof(float));
        kv->stage = xmalloc((size_t)ctx * 2 * c->head_dim * sizeof(float));
        kv->stage_score = xmalloc((size_t)ctx * sizeof(float));
        kv->stage_pos = xmalloc((size_t)ctx * sizeof(int));
        kv->stage_tier = xmalloc((size_t)ctx);
        kv->tmp_table = xmalloc(kv->table_width * sizeof(int));
    }
    kv->acc_high = xmalloc((size_t)c->n_layers * c->n_kv_heads * sizeof(long));
    kv->acc_low = xmalloc((size_t)c->n_layers * c->n_kv_heads * sizeof(long));
    kv->acc_seen = xmalloc((size_t)c->n_layers * c->n_kv_heads * sizeof(long));
}

/* a one-tier cache: every token at precision prec */
static void build_kvcache(KVCache *kv, const Config *c, int n_seqs, int ctx, size_t kv_mem_mib,
                          LkvPrecision prec) {
    build_kvcache_tiers(kv, c, n_seqs, ctx, kv_mem_mib, &prec, 1);
}

static void free_kvcache(KVCache *kv) {
    free(kv->pool); free(kv->free_ids); free(kv->table); free(kv->n_tok); free(kv->n_pg);
    free(kv->n_seen); free(kv->want); free(kv->offset); free(kv->plan); free(kv->policy);
    free(kv->prefilling); free(kv->pscore); free(kv->stage); free(kv->stage_score);
    free(kv->stage_pos); free(kv->stage_tier); free(kv->tmp_table);
    free(kv->acc_high); free(kv->acc_low); free(kv->acc_seen);
    free(kv->swap.pages); free(kv->swap.free_ids);
}

/* ---- The memory manager (section 6). Every operation runs in the three steps that
 * leankv.cu runs as three kernels over all heads at once:
 *   1. prepare (kv_reserve, kv_release, kv_place, kv_take_planned): each head writes into
 *      want[head, tier] how many pages it takes, or gives back; heads not involved write 0
 *   2. kv_scan: an exclusive prefix sum of want[] gives each head its offset into the free
 *      ring, and the total (the only number the host needs)
 *   3. kv_apply_take / kv_apply_give: each head takes the free ids at its own offset from the
 *      front of the ring, or writes the ids it gives at its own offset past the end, and
 *      updates its table. The ranges are disjoint, so on the GPU the heads run in parallel and
 *      pages given by thousands of heads land as one contiguous run.
 * A take is all or nothing: when the total exceeds the free pages, nobody takes anything. */

static int kv_scan(KVCache *kv) {
    int total = 0, n = kv->n_heads_total * LKV_MAX_TIERS;
    for (int i = 0; i < n; i++) { kv->offset[i] = total; total += kv->want[i]; }
    return total;
}

/* table entry of the k-th page of a tier: high pages from the left, low from the right */
static inline int *kv_table_at(const KVCache *kv, int hh, int tier, int k) {
    int *tab = &kv->table[(size_t)hh * kv->table_width];
    return tier == LKV_HIGH ? &tab[k] : &tab[kv->table_width - 1 - k];
}

/* head hh takes free_ids[free_start + offset ...] as its tier's next pages; -1 and nothing
 * taken (want[] cleared) when the pool lacks the total */
static int kv_apply_take(KVCache *kv, int total) {
    int n = kv->n_heads_total * LKV_MAX_TIERS;
    if (total > kv->free_count) {
        memset(kv->want, 0, n * sizeof(int));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int hh = i / LKV_MAX_TIERS, t = i % LKV_MAX_TIERS;
        for (int k = 0; k < kv->want[i]; k++)
            *kv_table_at(kv, hh, t, kv->n_pg[i]++) =
                kv->free_ids[(kv->free_start + kv->offset[i] + k) % kv->n_pages];
        kv->want[i] = 0;
    }
    kv->free_start = (kv->free_start + total) % kv->n_pages;
    kv->free_count -= total;
    return 0;
}

/* head hh gives its tier's last want pages; they go to the ring past its end, at offset */
static void kv_apply_give(KVCache *kv, int total) {
    int n = kv->n_heads_total * LKV_MAX_TIERS;
    for (int i = 0; i < n; i++) {
        int hh = i / LKV_MAX_TIERS, t = i % LKV_MAX_TIERS, g = kv->want[i];
        for (int k = 0; k < g; k++)
            kv->free_ids[(kv->free_start + kv->free_count + kv->offset[i] + k) % kv->n_pages] =
                *kv_table_at(kv, hh, t, kv->n_pg[i] - g + k);
        kv->n_pg[i] -= g;
        kv->want[i] = 0;
    }
    kv->free_count += total;
}

/* high pages a head of seq needs to hold n prompt tokens: one more on a two-tier cache, for
 * placement (leankv.h 4c) */
static inline int kv_prompt_pages(const KVCache *kv, int n) {
    return kv->n_tiers > 1 ? lkv_prefill_pages(n, kv->layout[0].tokens)
                           : lkv_pages_for(n, kv->layout[0].tokens);
}

/* Makes every head of seq able to hold n tokens in the high tier (a prompt). All or nothing:
 * returns -1 and takes no page when the pool cannot cover every head; -2 past the table. */
static int kv_reserve(KVCache *kv, int seq, int n) {
    int need = kv_prompt_pages(kv, n);
    if (need + 1 > kv->table_width) return -2;    /* beyond the context the table was made for */
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h), have = kv->n_pg[hh * LKV_MAX_TIERS];
            kv->want[hh * LKV_MAX_TIERS] = have < need ? need - have : 0;
        }
    return kv_apply_take(kv, kv_scan(kv));
}

/* gives back every page of seq and empties its heads */
static void kv_release(KVCache *kv, int seq) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h);
            for (int t = 0; t < LKV_MAX_TIERS; t++) {
                kv->want[hh * LKV_MAX_TIERS + t] = kv->n_pg[hh * LKV_MAX_TIERS + t];
                kv->n_tok[hh * LKV_MAX_TIERS + t] = 0;
            }
            kv->n_seen[hh] = 0;
            kv->plan[hh * 3] = LKV_CASE_NONE;
        }
    kv->prefilling[seq] = 0;
    kv_apply_give(kv, kv_scan(kv));
}

/* ---- Swap space (leankv.h 4d): a preempted sequence's pages parked in host memory. Here both
 * pools are host memory; leankv.cu's swap space is pinned memory that its kernels copy to. */

/* mib MiB of pages of page_bytes (0: no swap space, preemption recomputes) */
static void build_swap(LkvSwapSpace *sp, size_t mib, int page_bytes) {
    memset(sp, 0, sizeof *sp);
    int n = lkv_swap_count(mib, page_bytes);
    if (n > 0 && lkv_swap_init(sp, xmalloc((size_t)n * page_bytes), n) != 0)
        die("out of memory for --swap-mem's %d pages", n);
}

/* Copies every page of seq into the swap space, per head its high pages then its low ones,
 * with each head's counts and seq's policy, into s; the caller then releases seq. -1 and
 * nothing copied when the swap space lacks the room. */
static int kv_swap_out(KVCache *kv, int seq, LkvSwapped *s) {
    int heads = kv->n_layers * kv->n_kv_heads, a0 = kv_head(kv, seq, 0, 0), T = LKV_MAX_TIERS;
    int n = 0;
    for (int i = 0; i < heads * T; i++) n += kv->n_pg[a0 * T + i];
    if (lkv_swap_take(&kv->swap, n, s) != 0) return -1;
    s->n_tok = xmalloc(heads * T * sizeof(int));
    s->n_pg = xmalloc(heads * T * sizeof(int));
    memcpy(s->n_tok, kv->n_tok + a0 * T, heads * T * sizeof(int));
    memcpy(s->n_pg, kv->n_pg + a0 * T, heads * T * sizeof(int));
    s->len = kv->n_seen[a0];   /* every head of a sequence has seen every token */
    s->policy = kv->policy[seq];
    for (int a = 0, i = 0; a < heads; a++)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < s->n_pg[a * T + t]; k++, i++)
                memcpy(kv->swap.pages + (size_t)s->pages[i] * kv->page_bytes,
                       kv->pool + (size_t)*kv_table_at(kv, a0 + a, t, k) * kv->page_bytes,
                       kv->page_bytes);
    return 0;
}

/* Brings s back into the empty sequence seq: each head takes the pages it had, per tier (one
 * take, all or nothing: -1 and nothing changed when the pool lacks them), the bytes return in
 * the order they left, and the swap space gets its pages back. */
static int kv_swap_in(KVCache *kv, int seq, LkvSwapped *s) {
    int heads = kv->n_layers * kv->n_kv_heads, a0 = kv_head(kv, seq, 0, 0), T = LKV_MAX_TIERS;
    for (int i = 0; i < heads * T; i++) kv->want[a0 * T + i] = s->n_pg[i];
    if (kv_apply_take(kv, kv_scan(kv)) != 0) return -1;
    for (int a = 0, i = 0; a < heads; a++) {
        for (int t = 0; t < T; t++)
            for (int k = 0; k < s->n_pg[a * T + t]; k++, i++)
                memcpy(kv->pool + (size_t)*kv_table_at(kv, a0 + a, t, k) * kv->page_bytes,
                       kv->swap.pages + (size_t)s->pages[i] * kv->page_bytes, kv->page_bytes);
        kv->n_seen[a0 + a] = s->len;
    }
    memcpy(kv->n_tok + a0 * T, s->n_tok, heads * T * sizeof(int));
    kv->policy[seq] = s->policy;
    kv->prefilling[seq] = 0;
    lkv_swap_give(&kv->swap, s);
    return 0;
}

/* ---- Token storage: where a token lives, and its bytes */

/* page of token i of a tier of head hh, and its slot in that page */
static inline uint8_t *kv_page(const KVCache *kv, int hh, int tier, int i, int *slot) {
    int tpp = kv->layout[tier].tokens;
    *slot = i % tpp;
    return kv->pool + (size_t)*kv_table_at(kv, hh, tier, i / tpp) * kv->page_bytes;
}

/* address of token i of the high tier of head hh: page table[i / tpp], slot i % tpp */
static inline uint8_t *kv_high_page(const KVCache *kv, int hh, int i, int *slot) {
    return kv_page(kv, hh, LKV_HIGH, i, slot);
}

static inline float *kv_score_at(const KVCache *kv, int hh, int tier, int i) {
    int slot;
    uint8_t *page = kv_page(kv, hh, tier, i, &slot);
    return (float *)(page + kv->layout[tier].scores) + slot;
}

static inline int32_t *kv_pos_at(const KVCache *kv, int hh, int tier, int i) {
    int slot;
    uint8_t *page = kv_page(kv, hh, tier, i, &slot);
    return (int32_t *)(page + kv->layout[tier].pos) + slot;
}

static float h2f_table[65536];   /* fp16 bits -> fp32, filled once */

static void build_h2f_table(void) {
    for (int i = 0; i < 65536; i++) h2f_table[i] = lkv_h2f((uint16_t)i);
}

/* stores one head vector in slot `slot` of a page's code and scale/zero segments, quantized
 * to `bits` (leankv.h section 4b; 16 = fp16, 32 = fp32 exact) */
static inline void kv_store(uint8_t *codes, uint8_t *sz, LkvPrecision p, int bits, int slot,
                            int d, const float *x) {
    lkv_quantize(x, d, bits, p.groups, codes + (size_t)slot * lkv_code_bytes(d, bits),
                 (uint16_t *)(sz + (size_t)slot * lkv_sz_bytes(p.groups, bits)));
}

/* the inverse: the stored head vector, dequantized to fp32 */
static inline void kv_load(const uint8_t *codes, const uint8_t *sz, LkvPrecision p, int bits,
                           int slot, int d, float *x) {
    if (bits == 16) {   /* the common case, through a table rather than bit by bit */
        const uint16_t *h = (const uint16_t *)codes + (size_t)slot * d;
        for (int j = 0; j < d; j++) x[j] = h2f_table[h[j]];
        return;
    }
    lkv_dequantize(codes + (size_t)slot * lkv_code_bytes(d, bits),
                   (const uint16_t *)(sz + (size_t)slot * lkv_sz_bytes(p.groups, bits)), d, bits,
                   p.groups, x);
}

/* token i of a tier of head hh <- k, v quantized at the tier's precision, with its metadata
 * (score and position; a one-tier cache's pages keep none) */
static void kv_put(KVCache *kv, int hh, int tier, int i, const float *k, const float *v,
                   float score, int pos) {
    int slot, d = kv->head_dim;
    uint8_t *page = kv_page(kv, hh, tier, i, &slot);
    const LkvPageLayout *L = &kv->layout[tier];
    LkvPrecision p = kv->tier[tier];
    kv_store(page + L->k_codes, page + L->k_sz, p, p.kbits, slot, d, k);
    kv_store(page + L->v_codes, page + L->v_sz, p, p.vbits, slot, d, v);
    if (L->scores < 0) return;
    ((float *)(page + L->scores))[slot] = score;
    ((int32_t *)(page + L->pos))[slot] = pos;
}

/* the inverse: k, v dequantized (either may be NULL), score and position (NULL, or a
 * tiered cache's) */
static void kv_get(const KVCache *kv, int hh, int tier, int i, float *k, float *v, float *score,
                   int *pos) {
    int slot, d = kv->head_dim;
    const uint8_t *page = kv_page(kv, hh, tier, i, &slot);
    const LkvPageLayout *L = &kv->layout[tier];
    LkvPrecision p = kv->tier[tier];
    if (k) kv_load(page + L->k_codes, page + L->k_sz, p, p.kbits, slot, d, k);
    if (v) kv_load(page + L->v_codes, page + L->v_sz, p, p.vbits, slot, d, v);
    if (score) *score = ((const float *)(page + L->scores))[slot];
    if (pos) *pos = ((const int32_t *)(page + L->pos))[slot];
}

/* high-tier token `from` -> slot `to` of the same tier, bytes as they are (same precision) */
static void kv_copy_high(KVCache *kv, int hh, int from, int to) {
    int s0, s1, d = kv->head_dim;
    const uint8_t *src = kv_page(kv, hh, LKV_HIGH, from, &s0);
    uint8_t *dst = kv_page(kv, hh, LKV_HIGH, to, &s1);
    const LkvPageLayout *L = &kv->layout[0];
    LkvPrecision p = kv->tier[0];
    int kc = lkv_code_bytes(d, p.kbits), ks = lkv_sz_bytes(p.groups, p.kbits);
    int vc = lkv_code_bytes(d, p.vbits), vs = lkv_sz_bytes(p.groups, p.vbits);
    memmove(dst + L->k_codes + s1 * kc, src + L->k_codes + s0 * kc, kc);
    memmove(dst + L->k_sz + s1 * ks, src + L->k_sz + s0 * ks, ks);
    memmove(dst + L->v_codes + s1 * vc, src + L->v_codes + s0 * vc, vc);
    memmove(dst + L->v_sz + s1 * vs, src + L->v_sz + s0 * vs, vs);
    if (L->scores < 0) return;
    ((float *)(dst + L->scores))[s1] = ((const float *)(src + L->scores))[s0];
    ((int32_t *)(dst + L->pos))[s1] = ((const int32_t *)(src + L->pos))[s0];
}

/* demotion (section 2): high-tier token i is dequantized and quantized again, with fresh
 * min/max, at the low tier's precision into low-tier slot j; it keeps its score and position */
static void kv_demote(KVCache *kv, int hh, int i, int j) {
    float k[LKV_MAX_HEAD_DIM], v[LKV_MAX_HEAD_DIM], score;
    int pos;
    kv_get(kv, hh, LKV_HIGH, i, k, v, &score, &pos);
    kv_put(kv, hh, LKV_LOW, j, k, v, score, pos);
}

/* Appends one token's key (after RoPE) and value to the high tier of head hh: the prompt. */
static void kv_append(KVCache *kv, int hh, const float *k, const float *v, int pos) {
    kv_put(kv, hh, LKV_HIGH, kv->n_tok[hh * LKV_MAX_TIERS]++, k, v, 0.0f, pos);
    kv->n_seen[hh]++;
}

/* Writes a decode step's new token into head hh as its planned case says (leankv.h 4c; no
 * plan: an append). The pages were taken by kv_take_planned. */
static void kv_write_token(KVCache *kv, int hh, const float *k, const float *v, int pos) {
    int *pl = &kv->plan[hh * 3], *nt = &kv->n_tok[hh * LKV_MAX_TIERS];
    int c = pl[0], L = pl[1], R = pl[2];
    if (c == LKV_CASE_NONE || c == LKV_CASE_APPEND) { kv_append(kv, hh, k, v, pos); }
    else {
        if (c == LKV_CASE_SWAP) kv_demote(kv, hh, L, R);                /* R is overwritten */
        if (c == LKV_CASE_DEMOTE) kv_demote(kv, hh, L, nt[LKV_LOW]++);
        kv_put(kv, hh, LKV_HIGH, L, k, v, 0.0f, pos);                   /* L's slot: new token */
        kv->n_seen[hh]++;
    }
    pl[0] = LKV_CASE_NONE;
}

/* ---- The tier policy (two-tier caches; leankv.h section 4c) */

/* seq starts a prompt of n_prompt tokens with these alphas; its scores start at zero */
static void kv_begin(KVCache *kv, int seq, int n_prompt, float alpha_high, float alpha_low) {
    LkvPolicy *p = &kv->policy[seq];
    *p = kv->defaults;
    p->alpha_high = alpha_high;
    p->alpha_low = alpha_low;
    p->first = lkv_score_first(n_prompt);
    if (kv->n_tiers < 2) return;
    kv->prefilling[seq] = 1;
    size_t rows = (size_t)kv->n_layers * kv->n_kv_heads * kv->group;
    for (size_t r = 0; r < rows; r++)
        memset(kv->pscore + r * kv->ctx, 0, (size_t)n_prompt * sizeof(float));
}

/* the eligible token of lowest mean in a tier of head hh at length n, or -1; *m its mean */
static int kv_lowest(const KVCache *kv, int hh, int tier, int n, const LkvPolicy *p, float *m) {
    int best = -1;
    *m = INFINITY;
    for (int i = 0; i < kv->n_tok[hh * LKV_MAX_TIERS + tier]; i++) {
        int pos = *kv_pos_at(kv, hh, tier, i);
        if (!lkv_eligible(pos, n, p->window)) continue;
        float mean = lkv_mean(*kv_score_at(kv, hh, tier, i), n, pos, p->first);
        if (mean < *m) { *m = mean; best = i; }
    }
    return best;
}

/* Decides, for every head of seq, the case of the token at position pos (leankv.h 4c), before
 * that step's attention; returns the pages the cases need. A one-tier cache always appends. */
static int kv_plan_step(KVCache *kv, int seq, int pos) {
    int pages = 0;
    const LkvPolicy *p = &kv->policy[seq];
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h), *pl = &kv->plan[hh * 3];
            pl[0] = LKV_CASE_APPEND; pl[1] = pl[2] = -1;
            if (kv->n_tiers > 1) {
                float mL, mR;
                pl[1] = kv_lowest(kv, hh, LKV_HIGH, pos, p, &mL);
                pl[2] = kv_lowest(kv, hh, LKV_LOW, pos, p, &mR);
                pl[0] = lkv_decode_case(mL, mR, pos, p->alpha_high, p->alpha_low);
            }
            for (int t = 0; t < kv->n_tiers; t++)
                pages += lkv_case_pages(pl[0], t, kv->n_tok[hh * LKV_MAX_TIERS + t],
                                        kv->n_pg[hh * LKV_MAX_TIERS + t], kv->layout[t].tokens);
        }
    return pages;
}

/* Takes the pages that every planned head needs (any number of sequences at once): prepare
 * from the plans, scan, take. All or nothing: -1 when the pool lacks them. */
static int kv_take_planned(KVCache *kv) {
    for (int hh = 0; hh < kv->n_heads_total; hh++) {
        int c = kv->plan[hh * 3];
        if (c == LKV_CASE_NONE) continue;
        for (int t = 0; t < kv->n_tiers; t++)
            kv->want[hh * LKV_MAX_TIERS + t] =
                lkv_case_pages(c, t, kv->n_tok[hh * LKV_MAX_TIERS + t],
                               kv->n_pg[hh * LKV_MAX_TIERS + t], kv->layout[t].tokens);
    }
    return kv_apply_take(kv, kv_scan(kv));
}

/* Prefill placement of one head (section 4): every prompt token gets its score (the max over
 * the GQA group of the query heads' sums), eligible ones are classified by their means, the
 * high tier is compacted in place (position order kept), the low tokens, staged in fp32
 * before the compaction can overwrite them, are quantized again at the low precision into the
 * pages that follow, and the table is rearranged: [high pages | spare pages ... low pages].
 * Sets want[] to the spare pages, which the caller gives back. */
static void kv_place_head(KVCache *kv, int seq, int l, int h) {
    int hh = kv_head(kv, seq, l, h), d = kv->head_dim, n = kv->n_tok[hh * LKV_MAX_TIERS];
    const LkvPolicy *p = &kv->policy[seq];
    const float *ps = kv->pscore + ((size_t)l * kv->n_kv_heads + h) * kv->group * kv->ctx;
    int nh = 0, nl = 0;
    for (int i = 0; i < n; i++) {
        float score = ps[i];   /* index i is position i: nothing has moved during prefill */
        for (int g = 1; g < kv->group; g++)
            if (ps[(size_t)g * kv->ctx + i] > score) score = ps[(size_t)g * kv->ctx + i];
        int pos = *kv_pos_at(kv, hh, LKV_HIGH, i);
        int tier = lkv_eligible(pos, n, p->window)
                       ? lkv_classify(lkv_mean(score, n, pos, p->first), n, p->alpha_high,
                                      p->alpha_low)
                       : LKV_HIGH;
        kv->stage_tier[i] = (uint8_t)tier;
        *kv_score_at(kv, hh, LKV_HIGH, i) = score;
        if (tier == LKV_LOW) {   /* staged before the compaction below moves anything */
            kv_get(kv, hh, LKV_HIGH, i, kv->stage + (size_t)nl * 2 * d,
                   kv->stage + (size_t)nl * 2 * d + d, &kv->stage_score[nl], &kv->stage_pos[nl]);
            nl++;
        }
    }
    for (int i = 0; i < n; i++)   /* compaction: token i moves to nh <= i */
        if (kv->stage_tier[i] == LKV_HIGH) { if (nh != i) kv_copy_high(kv, hh, i, nh); nh++; }
    int np = kv->n_pg[hh * LKV_MAX_TIERS], ph = lkv_pages_for(nh, kv->layout[0].tokens);
    int pl = lkv_pages_for(nl, kv->layout[1].tokens), spare = np - ph - pl;
    if (spare < 0) die("internal: placement needs %d pages, the head holds %d", ph + pl, np);
    /* table: [0, ph) high, [ph, ph + pl) become the low pages (moved to the right end),
     * [ph + pl, np) spare, kept just after the high pages so that a give returns them */
    int *tab = &kv->table[(size_t)hh * kv->table_width];
    memcpy(kv->tmp_table, tab, np * sizeof(int));
    for (int k = 0; k < spare; k++) tab[ph + k] = kv->tmp_table[ph + pl + k];
    for (int k = 0; k < pl; k++) *kv_table_at(kv, hh, LKV_LOW, k) = kv->tmp_table[ph + k];
    kv->n_pg[hh * LKV_MAX_TIERS] = ph + spare;
    kv->n_pg[hh * LKV_MAX_TIERS + 1] = pl;
    kv->n_tok[hh * LKV_MAX_TIERS] = nh;
    kv->n_tok[hh * LKV_MAX_TIERS + 1] = nl;
    for (int j = 0; j < nl; j++)
        kv_put(kv, hh, LKV_LOW, j, kv->stage + (size_t)j * 2 * d, kv->stage + (size_t)j * 2 * d + d,
               kv->stage_score[j], kv->stage_pos[j]);
    kv->want[hh * LKV_MAX_TIERS] = spare;
}

/* after the whole prompt of seq is in: placement of every head, then the spare pages go back
 * (one give for all heads) */
static void kv_place(KVCache *kv, int seq) {
    if (kv->n_tiers < 2 || !kv->prefilling[seq]) return;
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) kv_place_head(kv, seq, l, h);
    kv_apply_give(kv, kv_scan(kv));
    kv->prefilling[seq] = 0;
}

/* ---- What the cache holds: the report every run prints, and --kv-map */

/* adds to the totals of (layer, KV head) a what one head held at its end: tokens in each tier,
 * tokens it processed, pages (the GPU engine's heads are counted through this too) */
static void kv_account_head(KVCache *kv, int a, int high, int low, int seen, int pages) {
    kv->acc_high[a] += high;
    kv->acc_low[a] += low;
    kv->acc_seen[a] += seen;
    kv->acc_pages += pages;
}

/* adds what seq holds now (at its end) to the totals */
static void kv_account(KVCache *kv, int seq) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h);
            const int *nt = &kv->n_tok[hh * LKV_MAX_TIERS], *np = &kv->n_pg[hh * LKV_MAX_TIERS];
            kv_account_head(kv, l * kv->n_kv_heads + h, nt[0], nt[1], kv->n_seen[hh],
                            np[0] + np[1]);
        }
}

static void kv_account_reset(KVCache *kv) {
    size_t n = (size_t)kv->n_layers * kv->n_kv_heads * sizeof(long);
    memset(kv->acc_high, 0, n); memset(kv->acc_low, 0, n); memset(kv->acc_seen, 0, n);
    kv->acc_pages = 0;
}

typedef struct {
    double seen, high, low;   /* token-heads: processed, held high, held low */
    double bits_only, physical; /* compression ratios (leankv.h 4c) */
} KVTotals;

static KVTotals kv_totals(const KVCache *kv) {
    KVTotals t = {0};
    for (int a = 0; a < kv->n_layers * kv->n_kv_heads; a++) {
        t.seen += kv->acc_seen[a]; t.high += kv->acc_high[a]; t.low += kv->acc_low[a];
    }
    int b0 = kv->tier[0].kbits + kv->tier[0].vbits;
    int b1 = kv->n_tiers > 1 ? kv->tier[1].kbits + kv->tier[1].vbits : 0;
    t.bits_only = lkv_ratio_bits(t.seen, t.high, b0, t.low, b1);
    t.physical = lkv_ratio_physical(t.seen, kv->head_dim, (double)kv->acc_pages, kv->page_bytes);
    return t;
}

/* one line: the tier fractions over every processed token of every head, and both ratios */
static void kv_report(const KVCache *kv, FILE *f) {
    KVTotals t = kv_totals(kv);
    if (t.seen == 0) return;
    fprintf(f, "kv tiers: high %.2f%%, low %.2f%%, pruned %.2f%% of %.0f tokens x heads; "
            "compression %.2fx bits-only, %.2fx physical\n", 100 * t.high / t.seen,
            100 * t.low / t.seen, 100 * (t.seen - t.high - t.low) / t.seen, t.seen, t.bits_only,
            t.physical);
}

static void kv_describe_policy(const KVCache *kv, FILE *f);

/* page size, tokens per page and waste of each tier (and leankv's policy): said once at start */
static void kv_describe(const KVCache *kv, FILE *f) {
    for (int t = 0; t < kv->n_tiers; t++) {
        LkvPrecision p = kv->tier[t];
        const LkvPageLayout *L = &kv->layout[t];
        fprintf(f, "kv cache: k%dv%d, %d group%s: page %d bytes, %d tokens per page, waste %.1f%%, "
                "%d pages\n", p.kbits, p.vbits, p.groups, p.groups > 1 ? "s" : "",
                kv->page_bytes, L->tokens, 100.0 * (kv->page_bytes - L->used) / kv->page_bytes,
                kv->n_pages);
    }
    kv_describe_policy(kv, f);
}

/* leankv's tiers and policy (two tiers) */
static void kv_describe_policy(const KVCache *kv, FILE *f) {
    if (kv->n_tiers > 1)
        fprintf(f, "kv cache: leankv, tier high k%dv%d, low k%dv%d; alpha_high %g, alpha_low %g, "
                "window %d; scores over the last %d prompt rows\n", kv->tier[0].kbits,
                kv->tier[0].vbits, kv->tier[1].kbits, kv->tier[1].vbits, kv->defaults.alpha_high,
                kv->defaults.alpha_low, kv->defaults.window, LKV_SCORE_ROWS);
}

/* --kv-map: a PNG with three panels side by side -- the fraction of processed tokens kept
 * high, kept low and pruned -- each a grid of layers (rows, layer 0 at the top) by KV heads
 * (columns); the stronger the colour, the larger the fraction, which is also written in each
 * cell in percent. Labels are drawn with stb_easy_font's rectangles. */
#define MAP_CELL_W 30
#define MAP_CELL_H 14
#define MAP_LEFT 44
#define MAP_TOP 46
#define MAP_GAP 22

static void map_rect(uint8_t *img, int W, int H, int x0, int y0, int x1, int y1,
                     const uint8_t *rgb) {
    for (int y = y0 < 0 ? 0 : y0; y < y1 && y < H; y++)
        for (int x = x0 < 0 ? 0 : x0; x < x1 && x < W; x++) memcpy(img + 3 * ((size_t)y * W + x), rgb, 3);
}

static void map_text(uint8_t *img, int W, int H, int x, int y, const char *text, int scale,
                     const uint8_t *rgb) {
    static float quads[4096 * 4];   /* 16-byte vertices: x, y, z, colour */
    char buf[128];
    snprintf(buf, sizeof buf, "%s", text);
    int n = stb_easy_font_print(0, 0, buf, NULL, quads, sizeof quads);
    for (int q = 0; q < n; q++) {
        float *v = quads + q * 16, x0 = v[0], y0 = v[1], x1 = v[0], y1 = v[1];
        for (int k = 1; k < 4; k++) {
            x0 = fminf(x0, v[4 * k]); x1 = fmaxf(x1, v[4 * k]);
            y0 = fminf(y0, v[4 * k + 1]); y1 = fmaxf(y1, v[4 * k + 1]);
        }
        map_rect(img, W, H, x + (int)(x0 * scale), y + (int)(y0 * scale), x + (int)(x1 * scale),
                 y + (int)(y1 * scale), rgb);
    }
}

static void kv_write_map(const KVCache *kv, const char *path) {
    int NL = kv->n_layers, NH = kv->n_kv_heads, pw = NH * MAP_CELL_W;
    int W = MAP_LEFT + 3 * pw + 2 * MAP_GAP + 12, H = MAP_TOP + NL * MAP_CELL_H + 34;
    uint8_t *img = xmalloc((size_t)W * H * 3);
    memset(img, 255, (size_t)W * H * 3);
    static const uint8_t hue[3][3] = {{0, 128, 60}, {30, 90, 210}, {210, 40, 40}};
    static const uint8_t black[3] = {0, 0, 0}, white[3] = {255, 255, 255}, grey[3] = {90, 90, 90};
    static const char *title[3] = {"kept high", "kept low", "pruned"};
    KVTotals tot = kv_totals(kv);
    for (int p = 0; p < 3; p++) {
        int x0 = MAP_LEFT + p * (pw + MAP_GAP);
        double f_all = tot.seen > 0 ? (p == 0 ? tot.high : p == 1 ? tot.low
                                      : tot.seen - tot.high - tot.low) / tot.seen : 0;
        char lab[64];
        snprintf(lab, sizeof lab, "%s", title[p]);
        map_text(img, W, H, x0, 6, lab, 2, hue[p]);
        snprintf(lab, sizeof lab, "all: %.1f%%", 100 * f_all);
        map_text(img, W, H, x0, 24, lab, 1, black);
        for (int h = 0; h < NH; h++) {
            snprintf(lab, sizeof lab, "h%d", h);
            map_text(img, W, H, x0 + h * MAP_CELL_W + 8, MAP_TOP - 10, lab, 1, grey);
        }
        for (int l = 0; l < NL; l++)
            for (int h = 0; h < NH; h++) {
                int a = l * NH + h;
                double seen = kv->acc_seen[a];
                double f = seen > 0 ? (p == 0 ? kv->acc_high[a] : p == 1 ? kv->acc_low[a]
                                       : seen - kv->acc_high[a] - kv->acc_low[a]) / seen : 0;
                uint8_t c[3];
                for (int k = 0; k < 3; k++) c[k] = (uint8_t)(255 - f * (255 - hue[p][k]) + 0.5);
                int cx = x0 + h * MAP_CELL_W, cy = MAP_TOP + l * MAP_CELL_H;
                map_rect(img, W, H, cx, cy, cx + MAP_CELL_W - 1, cy + MAP_CELL_H - 1, c);
                snprintf(lab, sizeof lab, "%d", (int)(100 * f + 0.5));
                map_text(img, W, H, cx + 4, cy + 3, lab, 1, f > 0.55 ? white : black);
            }
    }
    for (int l = 0; l < NL; l++) {
        if (l % 5 && l != NL - 1) continue;
        char lab[16];
        snprintf(lab, sizeof lab, "L%d", l);
        map_text(img, W, H, 6, MAP_TOP + l * MAP_CELL_H + 3, lab, 1, grey);
    }
    map_text(img, W, H, MAP_LEFT, MAP_TOP + NL * MAP_CELL_H + 8,
             "rows: layers; columns: KV heads; cells: %", 1, grey);
    if (!stbi_write_png(path, W, H, 3, img, W * 3)) die("--kv-map: cannot write '%s'", path);
    free(img);
}

/* ----------------------------------------------------------------------------------------
 * Forward pass: one token at a time (forward, the decode step), or a prompt chunk of rows at
 * once (forward_rows, the prefill), which reads each weight matrix once for all its rows.
 * The equations are in the comments. */

/* o = x / sqrt(mean(x^2) + eps) * w */
static void rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * (x[i] * inv);
}

/* y (d) = W (d, n) x (n) */
static void matmul(float *y, const float *x, const float *W, int n, int d) {
    int i;
#pragma omp parallel for private(i) schedule(static)
    for (i = 0; i < d; i++) {
        const float *row = W + (size_t)i * n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < n; j++) acc += row[j] * x[j];
        y[i] = acc;
    }
}

/* a . b, summed in vector lanes as matmul does */
static inline float dot(const float *a, const float *b, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < n; j++) acc += a[j] * b[j];
    return acc;
}

/* Y (n, d) = X (n, k) W^T, W (d, k): y = W x for each of n rows. One task is 4 rows of W
 * against all n rows of X, 4 at a time: the 16 dot products of a 4x4 tile share every load,
 * and the 4 weight rows stay in L1 while the chunk streams past, so W comes from memory once
 * per chunk rather than once per row. Most of prefill's speedup is here. */
static void matmul_rows(float *Y, const float *X, const float *W, int n, int k, int d) {
    int i;
#pragma omp parallel for private(i) schedule(static)
    for (i = 0; i < d; i += 4) {
        int t = 0;
        for (; t + 4 <= n && i + 4 <= d; t += 4) {
            const float *w0 = W + (size_t)i * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
            const float *x0 = X + (size_t)t * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
            /* a_ru = sum_j W[i+r, j] X[t+u, j] */
            float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
            float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, \
                                a20, a21, a22, a23, a30, a31, a32, a33)
            for (int j = 0; j < k; j++) {
                float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
                a00 += v0 * x0[j]; a01 += v0 * x1[j]; a02 += v0 * x2[j]; a03 += v0 * x3[j];
                a10 += v1 * x0[j]; a11 += v1 * x1[j]; a12 += v1 * x2[j]; a13 += v1 * x3[j];
                a20 += v2 * x0[j]; a21 += v2 * x1[j]; a22 += v2 * x2[j]; a23 += v2 * x3[j];
                a30 += v3 * x0[j]; a31 += v3 * x1[j]; a32 += v3 * x2[j]; a33 += v3 * x3[j];
            }
            float *y = Y + (size_t)t * d + i;
            y[0] = a00; y[1] = a10; y[2] = a20; y[3] = a30; y += d;
            y[0] = a01; y[1] = a11; y[2] = a21; y[3] = a31; y += d;
            y[0] = a02; y[1] = a12; y[2] = a22; y[3] = a32; y += d;
            y[0] = a03; y[1] = a13; y[2] = a23; y[3] = a33;
        }
        /* the edges: rows of X past the last full tile (n % 4), rows of W past it (d % 4) */
        for (; t < n; t++)
            for (int r = i; r < i + 4 && r < d; r++)
                Y[(size_t)t * d + r] = dot(W + (size_t)r * k, X + (size_t)t * k, k);
    }
}

/* rotate each pair (a, b) of every head by angle pos * theta^(-2i/head_dim), pair i being
 * channels (2i, 2i+1) (interleaved) or (i, i + head_dim/2) (half) */
static void rope(float *vec, int n_heads, int head_dim, int pos, float theta, int style) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float freq = powf(theta, -(float)(2 * i) / (float)head_dim);
        float ang = pos * freq, c = cosf(ang), s = sinf(ang);
        for (int h = 0; h < n_heads; h++) {
            float *hv = vec + h * head_dim;
            int a = style == LKV_ROPE_INTERLEAVED ? 2 * i : i;
            int b = style == LKV_ROPE_INTERLEAVED ? 2 * i + 1 : i + half;
            float x0 = hv[a], x1 = hv[b];
            hv[a] = x0 * c - x1 * s;
            hv[b] = x0 * s + x1 * c;
        }
    }
}

/* For the `group` query heads that share KV head hh (q, o: (group, head_dim)):
 *   a_gt = softmax_t(q_g . k_t / sqrt(head_dim)),  o_g = sum_t a_gt v_t
 * over every cached token: the high tier's, then the low tier's, each read through the page
 * table at its own precision (the order does not matter: RoPE was applied before caching).
 * Each key and value is dequantized once for the whole group. On return att (group, stride)
 * holds the probabilities a_gt, which the scores are made of. */
static void attention_paged(const KVCache *kv, int hh, int group, const float *q, float *att,
                            int stride, float *o) {
    int d = kv->head_dim, nh = kv->n_tok[hh * LKV_MAX_TIERS];
    int n = nh + kv->n_tok[hh * LKV_MAX_TIERS + 1];
    float scale = 1.0f / sqrtf((float)d), x[LKV_MAX_HEAD_DIM];
    for (int t = 0; t < n; t++) {
        kv_get(kv, hh, t < nh ? LKV_HIGH : LKV_LOW, t < nh ? t : t - nh, x, NULL, NULL, NULL);
        for (int g = 0; g < group; g++) {
            float s = 0.0f;
            for (int j = 0; j < d; j++) s += q[g * d + j] * x[j];
            att[(size_t)g * stride + t] = s * scale;
        }
    }
    for (int g = 0; g < group; g++) {
        float *a = att + (size_t)g * stride, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) if (a[t] > mx) mx = a[t];
        for (int t = 0; t < n; t++) { a[t] = expf(a[t] - mx); sum += a[t]; }
        for (int t = 0; t < n; t++) a[t] /= sum;
        for (int j = 0; j < d; j++) o[g * d + j] = 0.0f;
    }
    for (int t = 0; t < n; t++) {
        kv_get(kv, hh, t < nh ? LKV_HIGH : LKV_LOW, t < nh ? t : t - nh, NULL, x, NULL, NULL);
        for (int g = 0; g < group; g++) {
            float a = att[(size_t)g * stride + t];
            for (int j = 0; j < d; j++) o[g * d + j] += a * x[j];
        }
    }
}

/* Significance at a decode step (section 3): every cached token of head hh gains the max over
 * the GQA group of this step's probability (att as attention_paged left it). */
static void kv_score_decode(KVCache *kv, int hh, const float *att, int group, int stride) {
    int nh = kv->n_tok[hh * LKV_MAX_TIERS], n = nh + kv->n_tok[hh * LKV_MAX_TIERS + 1];
    for (int t = 0; t < n; t++) {
        float mx = att[t];
        for (int g = 1; g < group; g++)
            if (att[(size_t)g * stride + t] > mx) mx = att[(size_t)g * stride + t];
        *kv_score_at(kv, hh, t < nh ? LKV_HIGH : LKV_LOW, t < nh ? t : t - nh) += mx;
    }
}

/* attention_paged for n <= ATT_LANES consecutive rows of a prompt chunk, all for one query
 * head of KV head hh; row r sees the first n0 + r tokens (those before it, and itself). Each
 * key and value is read once for the n rows instead of once per row, and the rows are the
 * vector lanes: lane r does row r's sums in attention_paged's order, so each row gets what
 * attention_paged gives it (to rounding). q and o: (n, stride); att: (n0 + n - 1, ATT_LANES)
 * scratch. psc (NULL: no scores) gets the probabilities of rows from position `first` on.
 * Prefill only: every token is in the high tier at index = position. */
static void attention_rows(const KVCache *kv, int hh, int n0, int n, const float *q, float *o,
                           int stride, float *att, float *psc, int first) {
    int d = kv->head_dim, n_all = n0 + n - 1;   /* the tokens the last row sees */
    const LkvPageLayout *L = &kv->layout[0];
    float scale = 1.0f / sqrtf((float)d), x[LKV_MAX_HEAD_DIM], sum[ATT_LANES];
    float qo[LKV_MAX_HEAD_DIM][ATT_LANES];   /* the queries, later the outputs: [j][row] */
    for (int j = 0; j < d; j++)
        for (int r = 0; r < ATT_LANES; r++) qo[j][r] = r < n ? q[(size_t)r * stride + j] : 0.0f;
    /* s_rt = q_r . k_t / sqrt(d) for every row, 4 keys at a time so that each lane has 4
     * independent sums in flight; the keys after a row's own go unused */
    for (int t0 = 0; t0 < n_all; t0 += 4) {
        float k4[4][LKV_MAX_HEAD_DIM];
        int nk = n_all - t0 < 4 ? n_all - t0 : 4;
        for (int i = 0; i < 4; i++) {
            int slot;
            if (i >= nk) { memset(k4[i], 0, d * sizeof(float)); continue; }
            const uint8_t *page = kv_high_page(kv, hh, t0 + i, &slot);
            kv_load(page + L->k_codes, page + L->k_sz, kv->tier[0], kv->tier[0].kbits, slot, d,
                    k4[i]);
        }
        float s[4][ATT_LANES] = {{0}};   /* s[i][r]: key t0+i, row r */
        for (int j = 0; j < d; j++)
#pragma omp simd
            for (int r = 0; r < ATT_LANES; r++) {
                s[0][r] += qo[j][r] * k4[0][j]; s[1][r] += qo[j][r] * k4[1][j];
                s[2][r] += qo[j][r] * k4[2][j]; s[3][r] += qo[j][r] * k4[3][j];
            }
        for (int i = 0; i < nk; i++)
            for (int r = 0; r < ATT_LANES; r++)
                att[(size_t)(t0 + i) * ATT_LANES + r] = s[i][r] * scale;
    }
    /* a_rt = exp(s_rt - max_t s_rt) over row r's tokens; sum_r normalizes them below */
    for (int r = 0; r < n; r++) {
        float mx = -INFINITY, *a = att + r;
        for (int t = 0; t < n0 + r; t++)
            if (a[(size_t)t * ATT_LANES] > mx) mx = a[(size_t)t * ATT_LANES];
        sum[r] = 0.0f;
        for (int t = 0; t < n0 + r; t++) {
            a[(size_t)t * ATT_LANES] = expf(a[(size_t)t * ATT_LANES] - mx);
            sum[r] += a[(size_t)t * ATT_LANES];
        }
    }
    /* prefill significance (section 3): rows at or after `first` (row r is the query at
     * position n0 + r - 1) add their probabilities to this query head's sums */
    for (int r = 0; psc && r < n; r++)
        if (n0 + r - 1 >= first)
            for (int t = 0; t < n0 + r; t++) psc[t] += att[(size_t)t * ATT_LANES + r] / sum[r];
    /* o_r = sum_t (a_rt / sum_r) v_t; a lane past its row's tokens adds 0 */
    for (int j = 0; j < d; j++)
        for (int r = 0; r < ATT_LANES; r++) qo[j][r] = 0.0f;
    for (int t = 0; t < n_all; t++) {
        int slot;
        const uint8_t *page = kv_high_page(kv, hh, t, &slot);
        kv_load(page + L->v_codes, page + L->v_sz, kv->tier[0], kv->tier[0].vbits, slot, d, x);
        float a[ATT_LANES];
        for (int r = 0; r < ATT_LANES; r++)
            a[r] = r < n && t < n0 + r ? att[(size_t)t * ATT_LANES + r] / sum[r] : 0.0f;
        for (int j = 0; j < d; j++)
#pragma omp simd
            for (int r = 0; r < ATT_LANES; r++) qo[j][r] += a[r] * x[j];
    }
    for (int r = 0; r < n; r++)
        for (int j = 0; j < d; j++) o[(size_t)r * stride + j] = qo[j][r];
}

/* silu(g) * u, with silu(g) = g * sigmoid(g) */
static void swiglu(float *g, const float *u, int n) {
    for (int i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Runs token at position pos of sequence seq through the model; returns the logits. The
 * caller has reserved cache room for pos + 1 tokens of seq. */
static float *forward(Model *m, KVCache *kv, int seq, int token, int pos) {
    Config *c = &m->c;
    Weights *w = &m->w;
    RunState *s = &m->s;
    int D = c->dim, hd = c->head_dim, QD = c->n_heads * hd, KVD = c->n_kv_heads * hd;
    int group = c->n_heads / c->n_kv_heads;

    memcpy(s->x, w->tok_embeddings + (size_t)token * D, D * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
        /* attention block: x += Wo attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x) */
        rmsnorm(s->xb, s->x, L->attn_norm, D, c->norm_eps);
        matmul(s->q, s->xb, L->wq, D, QD);
        matmul(s->k, s->xb, L->wk, D, KVD);
        matmul(s->v, s->xb, L->wv, D, KVD);
        if (L->bq) {
            for (int i = 0; i < QD; i++) s->q[i] += L->bq[i];
            for (int i = 0; i < KVD; i++) { s->k[i] += L->bk[i]; s->v[i] += L->bv[i]; }
        }
        rope(s->q, c->n_heads, hd, pos, c->rope_theta, c->rope_style);
        rope(s->k, c->n_kv_heads, hd, pos, c->rope_theta, c->rope_style);
        for (int h = 0; h < c->n_kv_heads; h++)   /* as kv_plan_step decided */
            kv_write_token(kv, kv_head(kv, seq, l, h), s->k + h * hd, s->v + h * hd, pos);
        /* each KV head with the group of query heads that share it; their probabilities
         * become the tokens' significance on a two-tier cache */
        int h;
#pragma omp parallel for private(h)
        for (h = 0; h < c->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h), stride = pos + 1;
            float *att = s->att + (size_t)h * group * stride;
            attention_paged(kv, hh, group, s->q + (size_t)h * group * hd, att, stride,
                            s->o + (size_t)h * group * hd);
            if (kv->n_tiers < 2) continue;
            if (!kv->prefilling[seq]) kv_score_decode(kv, hh, att, group, stride);
            else if (pos >= kv->policy[seq].first)   /* a prompt row: per query head sums */
                for (int g = 0; g < group; g++) {
                    float *ps = kv->pscore + ((size_t)l * c->n_heads + h * group + g) * kv->ctx;
                    for (int t = 0; t <= pos; t++) ps[t] += att[(size_t)g * stride + t];
                }
        }
        matmul(s->xb2, s->o, L->wo, QD, D);
        for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];

        /* feed-forward block: x += W2 (silu(W1 xn) * W3 xn), xn = rmsnorm(x) */
        rmsnorm(s->xb, s->x, L->ffn_norm, D, c->norm_eps);
        matmul(s->hb, s->xb, L->w1, D, c->hidden_dim);
        matmul(s->hb2, s->xb, L->w3, D, c->hidden_dim);
        swiglu(s->hb, s->hb2, c->hidden_dim);
        matmul(s->xb2, s->hb, L->w2, c->hidden_dim, D);
        for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];
    }
    /* logits = Wout rmsnorm(x) */
    rmsnorm(s->x, s->x, w->norm, D, c->norm_eps);
    matmul(s->logits, s->x, w->output, D, c->vocab_size);
    return s->logits;
}

/* Runs a prompt chunk through the model: tokens[0..n) at positions pos0 .. pos0+n-1 of
 * sequence seq, n <= s->chunk. The math of n calls of forward(), but every matrix product
 * takes all n rows at once (matmul_rows), attention ATT_LANES of them (attention_rows).
 * The last n_out rows get logits, returned as (n_out, vocab): 1 for a prompt, n for ppl and
 * -m logits, 0 for a chunk mid-prompt. The caller has reserved cache room for pos0 + n tokens
 * of seq. leankv.cu's forward(g, n_rows, n_out, ...) is the GPU twin. */
static float *forward_rows(Model *m, KVCache *kv, int seq, const int *tokens, int n, int pos0,
                           int n_out) {
    Config *c = &m->c;
    Weights *w = &m->w;
    RunState *s = &m->s;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, QD = c->n_heads * hd;
    int KVD = c->n_kv_heads * hd, group = c->n_heads / c->n_kv_heads;
    if (n == 1) return forward(m, kv, seq, tokens[0], pos0);   /* --prefill-chunk 1, or a tail */
    /* rows of a chunk see each other by index, so nothing may have been moved or dropped */
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++) {
            int hh = kv_head(kv, seq, l, h);
            if (kv->n_tok[hh * LKV_MAX_TIERS + 1] || kv->n_tok[hh * LKV_MAX_TIERS] != kv->n_seen[hh])
                die("internal: a prompt chunk after tier placement");
        }

    for (int r = 0; r < n; r++)
        memcpy(s->x + (size_t)r * D, w->tok_embeddings + (size_t)tokens[r] * D, D * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
        /* attention block: x += Wo attn(rope(Wq xn), rope(Wk xn), Wv xn), xn = rmsnorm(x) */
        for (int r = 0; r < n; r++)
            rmsnorm(s->xb + (size_t)r * D, s->x + (size_t)r * D, L->attn_norm, D, c->norm_eps);
        matmul_rows(s->q, s->xb, L->wq, n, D, QD);
        matmul_rows(s->k, s->xb, L->wk, n, D, KVD);
        matmul_rows(s->v, s->xb, L->wv, n, D, KVD);
        for (int r = 0; r < n; r++) {   /* each row at its own position, into the cache in order */
            float *q = s->q + (size_t)r * QD, *k = s->k + (size_t)r * KVD;
            float *v = s->v + (size_t)r * KVD;
            if (L->bq) {
                for (int i = 0; i < QD; i++) q[i] += L->bq[i];
                for (int i = 0; i < KVD; i++) { k[i] += L->bk[i]; v[i] += L->bv[i]; }
            }
            rope(q, c->n_heads, hd, pos0 + r, c->rope_theta, c->rope_style);
            rope(k, c->n_kv_heads, hd, pos0 + r, c->rope_theta, c->rope_style);
            for (int h = 0; h < c->n_kv_heads; h++)
                kv_append(kv, kv_head(kv, seq, l, h), k + h * hd, v + h * hd, pos0 + r);
        }
        int h;
#pragma omp parallel for private(h)
        for (h = 0; h < c->n_heads; h++) {
            /* causal: the chunk's keys are all cached now, so row r sees all but the n-1-r
             * rows after it */
            int hh = kv_head(kv, seq, l, h / group), n_tok = kv->n_tok[hh * LKV_MAX_TIERS];
            float *psc = kv->n_tiers > 1 && kv->prefilling[seq]
                             ? kv->pscore + ((size_t)l * c->n_heads + h) * kv->ctx : NULL;
            for (int r = 0; r < n; r += ATT_LANES)
                attention_rows(kv, hh, n_tok - (n - 1 - r), n - r < ATT_LANES ? n - r : ATT_LANES,
                               s->q + (size_t)r * QD + h * hd, s->o + (size_t)r * QD + h * hd, QD,
                               s->att + (size_t)h * (pos0 + n) * ATT_LANES, psc,
                               kv->policy[seq].first);
        }
        matmul_rows(s->xb2, s->o, L->wo, n, QD, D);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb2[i];

        /* feed-forward block: x += W2 (silu(W1 xn) * W3 xn), xn = rmsnorm(x) */
        for (int r = 0; r < n; r++)
            rmsnorm(s->xb + (size_t)r * D, s->x + (size_t)r * D, L->ffn_norm, D, c->norm_eps);
        matmul_rows(s->hb, s->xb, L->w1, n, D, H);
        matmul_rows(s->hb2, s->xb, L->w3, n, D, H);
        swiglu(s->hb, s->hb2, n * H);
        matmul_rows(s->xb2, s->hb, L->w2, n, H, D);
        for (size_t i = 0; i < (size_t)n * D; i++) s->x[i] += s->xb2[i];
    }
    if (n_out == 0) return NULL;
    /* logits = Wout rmsnorm(x), for the last n_out rows only: the classifier is the largest
     * matrix, and a prompt needs just its last row */
    for (int r = 0; r < n_out; r++)
        rmsnorm(s->xb + (size_t)r * D, s->x + (size_t)(n - n_out + r) * D, w->norm, D, c->norm_eps);
    matmul_rows(s->logits, s->xb, w->output, n_out, D, c->vocab_size);
    return s->logits;
}

/* ----------------------------------------------------------------------------------------
 * Sampler: greedy at temperature 0, else softmax(logits / T) with optional top-p. */

typedef struct { float p; int i; } ProbIndex;

typedef struct {
    int vocab_size;
    float temperature;
    float topp;
    uint64_t rng;          /* xorshift64* state */
    ProbIndex *candidates; /* (vocab_size) scratch for top-p */
} Sampler;

static void build_sampler(Sampler *sp, int vocab, float temp, float topp, uint64_t seed) {
    sp->vocab_size = vocab; sp->temperature = temp; sp->topp = topp;
    sp->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    sp->candidates = xmalloc(vocab * sizeof(ProbIndex));
}

static void free_sampler(Sampler *sp) { free(sp->candidates); }

static float random_f32(uint64_t *s) {   /* uniform in [0, 1) */
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return ((*s * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static void softmax(float *x, int n) {
    float mx = x[argmax(x, n)], sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static int cmp_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->p, pb = ((const ProbIndex *)b)->p;
    return pa > pb ? -1 : pa < pb ? 1 : 0;
}

/* smallest set of tokens whose probabilities reach topp, sampled within */
static int sample_topp(const float *p, int n, float topp, ProbIndex *cand, float coin) {
    int nc = 0;
    float cutoff = (1.0f - topp) / (n - 1 > 0 ? n - 1 : 1);  /* tokens below can't be in it */
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) cand[nc++] = (ProbIndex){p[i], i};
    qsort(cand, nc, sizeof *cand, cmp_prob_desc);
    float cum = 0.0f;
    int last = nc - 1;
    for (int i = 0; i < nc; i++) { cum += cand[i].p; if (cum > topp) { last = i; break; } }
    float r = coin * cum, acc = 0.0f;
    for (int i = 0; i <= last; i++) { acc += cand[i].p; if (r < acc) return cand[i].i; }
    return cand[last].i;
}

static int sample(Sampler *sp, float *logits) {
    if (sp->temperature == 0.0f) return argmax(logits, sp->vocab_size);
    for (int i = 0; i < sp->vocab_size; i++) logits[i] /= sp->temperature;
    softmax(logits, sp->vocab_size);
    float coin = random_f32(&sp->rng);
    if (sp->topp <= 0.0f || sp->topp >= 1.0f) {
        float acc = 0.0f;
        for (int i = 0; i < sp->vocab_size; i++) { acc += logits[i]; if (coin < acc) return i; }
        return sp->vocab_size - 1;
    }
    return sample_topp(logits, sp->vocab_size, sp->topp, sp->candidates, coin);
}

/* ----------------------------------------------------------------------------------------
 * Modes */

typedef struct {
    const char *model_path;
    const char *tokenizer_path; /* -z */
    const char *mode;           /* -m */
    const char *prompt;         /* -i or the positional argument */
    const char *system;         /* -y */
    const char *file;           /* -f */
    const char *out;            /* -o */
    float temperature;          /* -t */
    float topp;                 /* -p */
    uint64_t seed;              /* -s */
    int steps;                  /* -n tokens to generate, 0 = up to the context */
    int ctx;                    /* --ctx */
    size_t kv_mem_mib;          /* --kv-mem */
    LkvPrecision kv;            /* --kv, --kv-groups: the cache's precision (leankv: the high
                                   tier's, --kv-high) */
    const char *kv_name;        /* --kv as given */
    int kv_tiers;               /* 2 for --kv leankv, else 1 */
    LkvPrecision kv_low;        /* --kv-low: leankv's low tier */
    LkvPolicy policy;           /* --alpha-high, --alpha-low, --kv-window (leankv) */
    const char *kv_map;         /* --kv-map: PNG of the tier fractions per layer and KV head */
    const char *ref;            /* --ref: ppl also runs this cache and compares */
    LkvPrecision ref_kv;        /* its precision */
    int ppl_prefill;            /* --ppl-prefill: tokens that ppl feeds as a prompt */
    int ctx_len, trials;        /* --ctx-len, --trials: passkey */
    int print_ids;              /* --print-ids */
    int no_stop;                /* --no-stop: generate exactly -n tokens (benchmarks) */
    const char *device;         /* --device auto|cpu|cuda */
    int batch;                  /* --batch: sequences in flight at most (0: per device) */
    int requests;               /* --requests (bench) */
    int prompt_len, gen_len;    /* --prompt-len, --gen-len (bench) */
    int admit_steps;            /* --admit-steps: decode steps of room a join must leave */
    int prefill_chunk;          /* --prefill-chunk: prompt rows per forward pass (0: the device's) */
    size_t swap_mib;            /* --swap-mem: host memory that preempted requests are parked in */
    int help;                   /* -h: print the usage and exit 0 */
} Options;

/* the CPU cache the options ask for: one tier, or leankv's two with their policy */
static void build_cache(KVCache *kv, const Config *c, int n_seqs, const Options *o) {
    LkvPrecision tiers[2] = {o->kv, o->kv_low};
    build_kvcache_tiers(kv, c, n_seqs, o->ctx, o->kv_mem_mib, tiers, o->kv_tiers);
    kv->defaults = o->policy;
    if (kv->n_tiers > 1) kv_describe(kv, stderr);
}

static int is_stop(const Config *c, int id) {
    for (int i = 0; i < c->n_stop; i++) if (c->stop_ids[i] == id) return 1;
    return 0;
}

/* utf-8 validity, so a bad prompt is refused rather than silently altered */
static const char *first_invalid_utf8(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s, *e = p + n;
    while (p < e) {
        unsigned c = *p;
        int len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
                : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (!len || p + len > e) return (const char *)p;
        unsigned cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
        for (int i = 1; i < len; i++) {
            if ((p[i] & 0xC0) != 0x80) return (const char *)p;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return (const char *)p;
        p += len;
    }
    return NULL;
}

static Tokenizer *need_tokenizer(Model *m) {
    if (!m->tok) die("%s has no tokenizer; give one with -z", "the model");
    return m->tok;
}

/* text -> ids with the model's BOS rule; dies on invalid UTF-8 or a prompt over max_ids */
static int encode_text(Model *m, const char *text, size_t len, int *ids, int max_ids,
                       const char *what) {
    const char *bad = first_invalid_utf8(text, len);
    if (bad) die("%s has invalid UTF-8 at byte %zu", what, (size_t)(bad - text));
    int n = 0;
    if (m->c.add_bos && m->c.bos_id >= 0) { if (max_ids < 1) return -1; ids[n++] = m->c.bos_id; }
    int k = tokenizer_encode(need_tokenizer(m), text, len, ids + n, max_ids - n);
    if (k < 0) die("%s is longer than the context of %d tokens", what, max_ids);
    return n + k;
}

/* prints a token's bytes; control tokens are shown only when asked */
static void print_token(Model *m, int id) {
    int len;
    const char *p = tokenizer_piece(m->tok, id, &len);
    if (p && len) fwrite(p, 1, len, stdout);
    fflush(stdout);
}

static int reserve_or_die(KVCache *kv, int seq, int n) {
    int r = kv_reserve(kv, seq, n);
    if (r == -2) die("position %d is beyond the context (--ctx)", n - 1);
    if (r == -1) die("KV pool full: %d pages of %d bytes are all in use; raise --kv-mem",
                     kv->n_pages, kv->page_bytes);
    return r;
}

/* room for the decode step at position pos of seq: the tier policy decides each head's case,
 * then the pages those cases need are taken (leankv.h 4c) */
static void step_or_die(KVCache *kv, int seq, int pos) {
    if (pos >= kv->ctx) die("position %d is beyond the context (--ctx)", pos);
    kv_plan_step(kv, seq, pos);
    if (kv_take_planned(kv) != 0)
        die("KV pool full: %d pages of %d bytes are all in use; raise --kv-mem", kv->n_pages,
            kv->page_bytes);
}

/* feeds ids[0..n) from position pos0, a chunk of rows per pass; returns the logits of the
 * last. A prompt from position 0 is a prefill: on a two-tier cache its tokens are placed in
 * the tiers once all are in. Later text (chat turns) on a two-tier cache goes one token at a
 * time through the decode policy, as generated tokens do. */
static float *feed(Model *m, KVCache *kv, const int *ids, int n, int pos0) {
    float *logits = NULL;
    if (pos0 > 0 && kv->n_tiers > 1) {
        for (int i = 0; i < n; i++) {
            step_or_die(kv, 0, pos0 + i);
            logits = forward(m, kv, 0, ids[i], pos0 + i);
        }
        return logits;
    }
    if (pos0 == 0) kv_begin(kv, 0, n, kv->defaults.alpha_high, kv->defaults.alpha_low);
    for (int i = 0; i < n; i += m->s.chunk) {
        int rows = n - i < m->s.chunk ? n - i : m->s.chunk;
        reserve_or_die(kv, 0, pos0 + i + rows);
        logits = forward_rows(m, kv, 0, ids + i, rows, pos0 + i, i + rows == n);
    }
    kv_place(kv, 0);
    return logits;
}

static void mode_generate(Model *m, KVCache *kv, Sampler *sp, const Options *o) {
    const char *prompt = o->prompt ? o->prompt : "";
    int *ids = xmalloc((size_t)(o->ctx + 1) * sizeof(int));
    int n = encode_text(m, prompt, strlen(prompt), ids, o->ctx, "the prompt");
    if (n == 0) die("the prompt is empty and the model has no BOS token to start from");
    if (n >= o->ctx) die("the prompt has %d tokens; the context (--ctx) is %d", n, o->ctx);
    int steps = o->steps > 0 && n + o->steps < o->ctx ? o->steps : o->ctx - n;
    fwrite(prompt, 1, strlen(prompt), stdout);
    fflush(stdout);
    double t0 = now_s();
    float *logits = feed(m, kv, ids, n, 0);
    double t1 = now_s();
    int pos = n, generated = 0;
    int *gen = xmalloc((size_t)(steps + 1) * sizeof(int));
    while (generated < steps) {
        int next = sample(sp, logits);
        if (is_stop(&m->c, next) && !o->no_stop) break;
        gen[generated++] = next;
        if (!o->print_ids) print_token(m, next);
        if (generated == steps) break;
        step_or_die(kv, 0, pos);
        logits = forward(m, kv, 0, next, pos++);
    }
    double t2 = now_s();
    printf("\n");
    if (o->print_ids) {
        for (int i = 0; i < generated; i++) printf("%s%d", i ? " " : "", gen[i]);
        printf("\n");
    }
    fprintf(stderr, "prompt: %d tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n", n,
            n / (t1 - t0 + 1e-9), generated, generated > 1 ? (generated - 1) / (t2 - t1 + 1e-9) : 0.0);
    kv_account(kv, 0);
    kv_release(kv, 0);
    free(gen);
    free(ids);
}

/* appends text to the conversation buffer of token ids */
static int chat_append(Model *m, const char *text, int *ids, int n, int max) {
    int k = tokenizer_encode(m->tok, text, strlen(text), ids + n, max - n);
    if (k < 0) die("the conversation outgrew the context of %d tokens", max);
    return n + k;
}

static void mode_chat(Model *m, KVCache *kv, Sampler *sp, const Options *o) {
    need_tokenizer(m);
    if (m->c.chat_template != LKV_CHAT_CHATML && m->c.chat_template != LKV_CHAT_LLAMA3)
        die("chat mode needs a ChatML or Llama-3 template; this model has kind %d",
            m->c.chat_template);
    int chatml = m->c.chat_template == LKV_CHAT_CHATML;
    int *ids = xmalloc((size_t)(o->ctx + 1) * sizeof(int));
    int n = 0, pos = 0;
    char line[8192];
    if (m->c.add_bos && m->c.bos_id >= 0) ids[n++] = m->c.bos_id;
    /* -y, else the system message that the model's template adds by itself */
    char *system = NULL;
    if (o->system) system = strdup(o->system);
    else if (m->system) system = strndup(m->system, m->system_len);
    if (system) {
        const char *bad = first_invalid_utf8(system, strlen(system));
        if (bad) die("the system prompt has invalid UTF-8");
        n = chat_append(m, chatml ? "<|im_start|>system\n" :
                        "<|start_header_id|>system<|end_header_id|>\n\n", ids, n, o->ctx);
        n = chat_append(m, system, ids, n, o->ctx);
        free(system);
        n = chat_append(m, chatml ? "<|im_end|>\n" : "<|eot_id|>", ids, n, o->ctx);
    }
    int first = 1;
    for (;;) {
        const char *user;
        if (first && o->prompt) user = o->prompt;
        else {
            if (o->prompt) break;          /* -i: one turn, then stop */
            printf("User: ");
            fflush(stdout);
            if (!fgets(line, sizeof line, stdin)) break;
            line[strcspn(line, "\n")] = 0;
            user = line;
        }
        first = 0;
        const char *bad = first_invalid_utf8(user, strlen(user));
        if (bad) { fprintf(stderr, "leankv: error: invalid UTF-8 in the message\n"); continue; }
        n = chat_append(m, chatml ? "<|im_start|>user\n" :
                        "<|start_header_id|>user<|end_header_id|>\n\n", ids, n, o->ctx);
        n = chat_append(m, user, ids, n, o->ctx);
        n = chat_append(m, chatml ? "<|im_end|>\n<|im_start|>assistant\n" :
                        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                        ids, n, o->ctx);
        if (n >= o->ctx) die("the conversation outgrew the context of %d tokens", o->ctx);
        float *logits = feed(m, kv, ids + pos, n - pos, pos);
        pos = n;
        printf("Assistant: ");
        int generated = 0;
        for (;;) {
            int next = sample(sp, logits);
            if (pos >= o->ctx) die("the conversation outgrew the context of %d tokens", o->ctx);
            ids[n++] = next;
            step_or_die(kv, 0, pos);
            logits = forward(m, kv, 0, next, pos++);   /* the end token is part of the history */
            if (is_stop(&m->c, next)) break;
            print_token(m, next);
            if (o->steps > 0 && ++generated >= o->steps) break;
        }
        if (chatml) n = chat_append(m, "\n", ids, n, o->ctx);
        printf("\n");
    }
    if (o->print_ids)   /* the whole conversation as the model saw it */
        for (int i = 0; i < n; i++) printf("%d%s", ids[i], i + 1 < n ? " " : "\n");
    kv_account(kv, 0);
    kv_release(kv, 0);
    free(ids);
}

static void mode_tokenize(Model *m, const Options *o) {
    const char *text = o->prompt ? o->prompt : "";
    size_t len = strlen(text);
    int max = (int)(len + 2 < (size_t)INT_MAX ? len + 2 : INT_MAX);
    int *ids = xmalloc((size_t)max * sizeof(int));
    int n = encode_text(m, text, len, ids, max, "the text");
    for (int i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
    free(ids);
}

/* a whole file in memory, NUL-terminated; one larger than the machine's memory is refused
 * before anything is allocated */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die("cannot size '%s': %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die("'%s' is a folder, not a file", path);
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek '%s'", path);
    long n = ftell(f);
    if (n < 0) die("cannot size '%s'", path);
    if ((unsigned long)n >= memory_bytes())
        die("'%s' is %ld bytes, more than this machine's memory (%zu bytes)", path, n,
            memory_bytes());
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) die("'%s' (%ld bytes) does not fit in memory", path, n);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) die("cannot read '%s'", path);
    fclose(f);
    buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

/* log of the sum of exp(x): the softmax denominator, in double */
static double log_sum_exp(const float *x, int n) {
    float mx = x[argmax(x, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
    return mx + log(sum);
}

/* KL(p || q) of the softmax distributions of logits a (p) and b (q) */
static double kl_divergence(const float *a, const float *b, int n) {
    double la = log_sum_exp(a, n), lb = log_sum_exp(b, n), kl = 0.0;
    for (int i = 0; i < n; i++) {
        double lpa = a[i] - la, lpb = b[i] - lb;
        kl += exp(lpa) * (lpa - lpb);
    }
    return kl > 0 ? kl : 0.0;
}

/* Perplexity = exp(mean over t of -log p(x_{t+1} | x_{<=t})) over the first ctx tokens of the
 * file. The first --ppl-prefill tokens go in as a prompt, every later one through the decode
 * path, one at a time, so a compressed cache acts exactly as during generation. With --ref,
 * the same text also runs through a second cache (say fp16) and every next-token distribution
 * is compared: mean KL(ref || this) and top-1 agreement. */
static void mode_ppl(Model *m, KVCache *kv, const Options *o) {
    if (!o->file) die("-m ppl needs the text file with -f");
    size_t len;
    char *text = read_file(o->file, &len);
    int max = (int)(len + 2 < (size_t)INT_MAX ? len + 2 : INT_MAX);
    int *ids = xmalloc((size_t)max * sizeof(int));
    int n = encode_text(m, text, len, ids, max, o->file);
    if (n > o->ctx) n = o->ctx;
    if (n < 2) die("%s gives %d tokens; perplexity needs at least 2", o->file, n);
    int V = m->c.vocab_size, n_prefill = o->ppl_prefill < n - 1 ? o->ppl_prefill : n - 1;
    KVCache ref;
    if (o->ref) build_kvcache(&ref, &m->c, 1, o->ctx, o->kv_mem_mib, o->ref_kv);
    if (kv->n_tiers < 2) kv_describe(kv, stderr);   /* a two-tier cache said it at build */
    kv_begin(kv, 0, n_prefill, kv->defaults.alpha_high, kv->defaults.alpha_low);
    if (n_prefill == 0) kv_place(kv, 0);
    float *ref_logits = xmalloc((size_t)m->s.chunk * V * sizeof(float));   /* (chunk, vocab) */
    double nll = 0.0, nll_ref = 0.0, kl = 0.0;
    long agree = 0;
    double t0 = now_s();
    for (int t = 0; t < n - 1;) {
        /* rows t < n_prefill are the prompt, a chunk of rows at a time; the rest are decode
         * steps, one row each. The split is where a compressing cache decides what to keep of
         * the prompt. Every row's logits are wanted. */
        int rows = t >= n_prefill ? 1 : n_prefill - t < m->s.chunk ? n_prefill - t : m->s.chunk;
        if (o->ref) {
            reserve_or_die(&ref, 0, t + rows);
            memcpy(ref_logits, forward_rows(m, &ref, 0, ids + t, rows, t, rows),
                   (size_t)rows * V * sizeof(float));
        }
        if (t >= n_prefill) step_or_die(kv, 0, t);
        else reserve_or_die(kv, 0, t + rows);
        float *lg = forward_rows(m, kv, 0, ids + t, rows, t, rows);
        if (t < n_prefill && t + rows == n_prefill) kv_place(kv, 0);   /* the prompt is in */
        for (int i = 0; i < rows; i++, t++) {
            float *logits = lg + (size_t)i * V, *rl = ref_logits + (size_t)i * V;
            nll -= logits[ids[t + 1]] - log_sum_exp(logits, V);
            if (o->ref) {
                nll_ref -= rl[ids[t + 1]] - log_sum_exp(rl, V);
                kl += kl_divergence(rl, logits, V);
                agree += argmax(rl, V) == argmax(logits, V);
            }
        }
    }
    kv_account(kv, 0);
    KVTotals tot = kv_totals(kv);
    fprintf(stderr, "%d tokens (%d prefill, %d decode) in %.1f s\n", n, n_prefill,
            n - 1 - n_prefill, now_s() - t0);
    printf("tokens: %d\n", n);
    printf("kv: %s, compression %.2fx bits-only, %.2fx physical\n", o->kv_name, tot.bits_only,
           tot.physical);
    printf("tiers: high %.4f, low %.4f, pruned %.4f\n", tot.high / tot.seen, tot.low / tot.seen,
           (tot.seen - tot.high - tot.low) / tot.seen);
    if (o->ref) {
        printf("ref %s perplexity: %.6f\n", o->ref, exp(nll_ref / (n - 1)));
        printf("mean KL(ref || kv): %.6f\n", kl / (n - 1));
        printf("top-1 agreement: %.4f\n", (double)agree / (n - 1));
        kv_release(&ref, 0);
        free_kvcache(&ref);
    }
    printf("perplexity: %.6f\n", exp(nll / (n - 1)));
    kv_release(kv, 0);
    free(ref_logits);
    free(ids);
    free(text);
}

/* Where the needle went (two tiers), right after placement: of the prompt's digit tokens (the
 * key's, twice: the only digits in the passkey text), how many some head has pruned, in how
 * many of the heads, and which heads (L<layer>H<KV head>). kept (ctx) is scratch; the line goes
 * into out (cap bytes), printed after the answer. */
static void needle_report(const KVCache *kv, Tokenizer *tk, const int *ids, int n, char *kept,
                          char *out, size_t cap) {
    enum { MAX_DIGITS = 64 };
    int at[MAX_DIGITS], gone[MAX_DIGITS] = {0};   /* each digit token's position; pruned somewhere */
    int digits = 0, hit = 0, heads = 0, pl;
    for (int i = 0; i < n && digits < MAX_DIGITS; i++) {
        const char *pc = tokenizer_piece(tk, ids[i], &pl);
        if (pl == 1 && isdigit((unsigned char)pc[0])) at[digits++] = i;
    }
    size_t w = (size_t)snprintf(out, cap, "  needle after placement:");
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int hh = kv_head(kv, 0, l, h), lost = 0;
            memset(kept, 0, (size_t)kv->ctx);
            for (int t = 0; t < kv->n_tiers; t++)
                for (int i = 0; i < kv->n_tok[hh * LKV_MAX_TIERS + t]; i++)
                    kept[*kv_pos_at(kv, hh, t, i)] = 1;
            for (int d = 0; d < digits; d++)
                if (!kept[at[d]]) gone[d] = lost = 1;
            if (lost && w < cap) w += (size_t)snprintf(out + w, cap - w, " L%dH%d", l, h);
            heads += lost;
        }
    for (int d = 0; d < digits; d++) hit += gone[d];
    if (w < cap)
        snprintf(out + w, cap - w, "%s pruned %d of its %d digit tokens in %d of %d heads",
                 heads ? ";" : "", hit, digits, heads, kv->n_layers * kv->n_kv_heads);
}

/* Passkey retrieval: a 5-digit number hidden at a given depth of filler text, then the
 * question. Greedy answer; a trial is right when the answer's first digits are the number.
 * --trials seeded trials at each depth 10%, 20%, ..., 90% of a --ctx-len-token context. */
static void mode_passkey(Model *m, KVCache *kv, const Options *o) {
    static const char *intro = "There is an important pass key hidden inside a lot of "
        "irrelevant text. Find it and memorize it. I will quiz you about the pass key.\n";
    static const char *filler = "The grass is green. The sky is blue. The sun is yellow. Here "
        "we go. There and back again. ";
    static const char *question = "\nWhat is the pass key? The pass key is";
    Tokenizer *tk = need_tokenizer(m);
    int L = o->ctx_len;
    if (L + 16 > o->ctx) die("--ctx-len %d needs --ctx of at least %d", L, L + 16);
    int cap = L + 64, n_fill;
    int *ids = xmalloc((size_t)(cap + 16) * sizeof(int)), *tmp = xmalloc((size_t)cap * sizeof(int));
    n_fill = tokenizer_encode(tk, filler, strlen(filler), tmp, cap);
    int n_intro = tokenizer_encode(tk, intro, strlen(intro), tmp, cap);
    int n_q = tokenizer_encode(tk, question, strlen(question), tmp, cap);
    int n_needle = 30;   /* about the needle's tokens; the total is adjusted below */
    int reps = (L - n_intro - n_q - n_needle) / n_fill;
    if (reps < 1) die("--ctx-len %d is too short for the passkey text", L);
    uint64_t rng = o->seed ? o->seed : 1;
    int correct = 0, total = 0;
    size_t buf_len = strlen(intro) + strlen(question) + (size_t)reps * strlen(filler) + 256;
    char *buf = xmalloc(buf_len), *kept = xmalloc((size_t)kv->ctx);
    for (int depth = 10; depth <= 90; depth += 10) {
        int ok_here = 0;
        for (int trial = 0; trial < o->trials; trial++) {
            int key = 10000 + (int)(random_f32(&rng) * 90000) % 90000;
            int at = reps * depth / 100;
            char *w = buf;
            w += sprintf(w, "%s", intro);
            for (int r = 0; r < reps; r++) {
                if (r == at) w += sprintf(w, "The pass key is %d. Remember it. %d is the pass key. ", key, key);
                w += sprintf(w, "%s", filler);
            }
            sprintf(w, "%s", question);
            int n = encode_text(m, buf, strlen(buf), ids, cap, "the passkey text");
            float *logits = feed(m, kv, ids, n, 0);
            char needle[2048] = "";
            if (trial == 0 && kv->n_tiers > 1) needle_report(kv, tk, ids, n, kept, needle, sizeof needle);
            char answer[64];
            int alen = 0;
            for (int g = 0; g < 8 && n + g < o->ctx; g++) {
                int next = argmax(logits, m->c.vocab_size);
                if (is_stop(&m->c, next)) break;
                int pl;
                const char *piece = tokenizer_piece(tk, next, &pl);
                for (int i = 0; i < pl && alen < (int)sizeof answer - 1; i++) answer[alen++] = piece[i];
                step_or_die(kv, 0, n + g);
                logits = forward(m, kv, 0, next, n + g);
            }
            answer[alen] = 0;
            kv_account(kv, 0);
            kv_release(kv, 0);
            char want[16];
            snprintf(want, sizeof want, "%d", key);
            const char *digits = answer;
            while (*digits && !isdigit((unsigned char)*digits)) digits++;
            int ok = strncmp(digits, want, 5) == 0 && !isdigit((unsigned char)digits[5]);
            ok_here += ok;
            if (trial == 0) {
                fprintf(stderr, "depth %d%%: %d tokens, key %d, answer \"%s\"\n", depth, n, key, answer);
                if (*needle) fprintf(stderr, "%s\n", needle);
            }
        }
        printf("depth %d%%: %d/%d\n", depth, ok_here, o->trials);
        fflush(stdout);
        correct += ok_here;
        total += o->trials;
    }
    printf("passkey: %d/%d\n", correct, total);
    free(buf); free(kept); free(ids); free(tmp);
}

/* -m logits: -i holds token ids; writes (T, vocab) fp32 logits to -o. For tests. */
static void mode_logits(Model *m, KVCache *kv, const Options *o) {
    if (!o->prompt || !o->out) die("-m logits needs ids with -i and an output file with -o");
    int cap = 16, n = 0;
    int *ids = xmalloc(cap * sizeof(int));
    const char *p = o->prompt;
    while (*p) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= m->c.vocab_size)
            die("-i: '%.20s' is not a token id below %d", p, m->c.vocab_size);
        if (n == cap) { cap *= 2; ids = realloc(ids, cap * sizeof(int)); if (!ids) die("oom"); }
        ids[n++] = (int)v;
        p = end;
    }
    if (n == 0) die("-i holds no token ids");
    if (n > o->ctx) die("%d ids exceed the context (--ctx) of %d", n, o->ctx);
    FILE *f = fopen(o->out, "wb");
    if (!f) die("cannot write '%s': %s", o->out, strerror(errno));
    kv_begin(kv, 0, n, kv->defaults.alpha_high, kv->defaults.alpha_low);  /* all prompt */
    for (int t = 0; t < n; t += m->s.chunk) {   /* every row's logits, a chunk at a time */
        int rows = n - t < m->s.chunk ? n - t : m->s.chunk;
        reserve_or_die(kv, 0, t + rows);
        float *logits = forward_rows(m, kv, 0, ids + t, rows, t, rows);
        size_t count = (size_t)rows * m->c.vocab_size;
        if (fwrite(logits, sizeof(float), count, f) != count) die("cannot write '%s'", o->out);
    }
    if (fclose(f) != 0) die("cannot write '%s'", o->out);
    kv_account(kv, 0);
    kv_release(kv, 0);
    free(ids);
}

/* ----------------------------------------------------------------------------------------
 * Many requests at once: continuous batching over the paged cache.
 *
 * Each running request holds a slot: a sequence index of the KV cache. Every step, waiting
 * requests join while slots and pages allow (their prompt goes through prefill), then every
 * running request advances by one token (decode). A finished request gives its pages back at
 * once, so the next one can join. When a decode step lacks pages, the request that joined
 * last is preempted: its pages are freed and it goes back to the front of the queue, to be
 * recomputed (prompt + what it had generated) when pages allow. Nothing is lost.
 *
 * The same scheduler drives the CPU (forward_rows() per prompt chunk, forward() per decode
 * row) and the GPU (leankv.cu's batched gpu_prefill / gpu_decode); only the engine_*
 * functions below differ. */

enum { REQ_QUEUED, REQ_RUNNING, REQ_DONE };

/* --admit-steps' default. In a simulation of this scheduler on the GPU benchmark's shape (512
 * requests of 1024 + 1024 tokens, a pool that holds 22 of them whole) 32 cut the preemptions by
 * a third, 64 by half, 128 by 62%; on shorter requests 128 already costs a tenth of the
 * sequences in flight. Measured there (H100, bench/RESULTS.md, session 9): 64 halved fp16's and
 * k8v4's preemptions, fp16 5% faster; leankv's settings level. */
#define ADMIT_STEPS 64

/* Prompt rows per forward pass (--prefill-chunk). The CPU keeps a chunk's scores over the whole
 * context, so its chunk stays small. On the GPU a 1,024-token prompt in one pass instead of two
 * of 512 prefills 29-40% faster (larger matrix products, twice the attention blocks a launch;
 * H100, bench/RESULTS.md session 13); 2,048 gains nothing more there. */
#define CPU_PREFILL_CHUNK 64
#define CPU_PREFILL_CHUNK_MAX 1024
#define GPU_PREFILL_CHUNK 1024
#define GPU_PREFILL_CHUNK_MAX 4096

typedef struct {
    char *id;            /* the request's "id", or its line number */
    char *prompt;        /* the prompt text (NULL for synthetic requests) */
    int *ids;            /* (n_prompt + max_new) prompt ids, then the generated ones */
    int n_prompt;        /* prompt tokens */
    int n_gen;           /* tokens generated so far */
    int max_new;         /* "n": tokens to generate at most */
    int no_stop;         /* generate exactly max_new (benchmarks) */
    float temperature;   /* "temperature" */
    float alpha_high, alpha_low; /* "alpha_high", "alpha_low": its tier thresholds (leankv) */
    uint64_t rng;        /* sampler state of this request */
    int state;           /* REQ_* */
    int slot;            /* its cache slot while running */
    int n_cached;        /* tokens of ids[] that are in the cache */
    int preemptions;     /* times it was preempted */
    LkvSwapped parked;   /* its cache in the swap space while preempted (parked.n_pages > 0) */
    double t_start, t_first, t_end; /* admission, first token, end (seconds) */
    char *error;         /* why it could not run, or NULL */
} Request;

typedef struct {
    Model *m;
    KVCache *kv;         /* CPU cache (n_seqs = max_batch), NULL on the GPU */
    GpuEngine *gpu;      /* GPU engine, NULL on the CPU */
    KVCache *acct;       /* the cache whose totals make the closing report: kv on the CPU; on
                            the GPU with two tiers a one-slot stand-in that only counts */
    int gpu_tiers;       /* tiers of the GPU engine's cache */
    int max_batch;       /* slots */
    int ctx;             /* tokens a sequence may hold */
    float topp;
    int admit_steps;     /* --admit-steps: decode steps of growth a join must leave pages for */
    int *slot_free;      /* (max_batch) 1 when the slot holds no request */
    float *logits;       /* (vocab) CPU scratch for one row's logits */
    /* statistics */
    double t_prefill, t_decode;  /* seconds spent in each */
    long n_prefill_tok, n_decode_tok;
    long n_recomputed;   /* prefill tokens of requests back after a preemption: its cost */
    int peak_running, peak_pages, preemptions;
    int swap_outs;       /* preemptions that parked the request in the swap space */
    long swap_pages;     /* pages they parked */
    double t_swap;       /* seconds spent copying them out and back */
    double sum_running;  /* sequences in flight, summed over decode steps */
    long n_steps;        /* decode steps */
    long step_pages;     /* pages the decode steps took: over sum_running, the rate of growth */
    int print_ids;       /* generate mode: print ids after the text */
    const char *kv_map;  /* --kv-map, written when the batch ends (CPU) */
} Batch;

/* pages that a prompt of n_total tokens in slot would take */
static int kv_pages_needed(const KVCache *kv, int seq, int n_total) {
    int need = kv_prompt_pages(kv, n_total), missing = 0;
    for (int l = 0; l < kv->n_layers; l++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            int have = kv->n_pg[kv_head(kv, seq, l, h) * LKV_MAX_TIERS];
            if (have < need) missing += need - have;
        }
    return missing;
}

static int engine_free_pages(Batch *b) {
#ifdef LKV_CUDA
    if (b->gpu) { GpuInfo gi; gpu_info(b->gpu, &gi); return gi.free_pages; }
#endif
    return b->kv->free_count;
}

static int engine_used_pages(Batch *b) {
#ifdef LKV_CUDA
    if (b->gpu) { GpuInfo gi; gpu_info(b->gpu, &gi); return gi.n_pages - gi.free_pages; }
#endif
    return b->kv->n_pages - b->kv->free_count;
}

/* tokens of the high (or only) tier that one page holds */
static int engine_tokens_per_page(Batch *b) {
#ifdef LKV_CUDA
    if (b->gpu) { GpuInfo gi; gpu_info(b->gpu, &gi); return gi.tokens_per_page; }
#endif
    return b->kv->layout[0].tokens;
}

/* pages that r's prompt (n tokens, plus one for its first decode step) needs */
static int engine_pages_needed(Batch *b, Request *r, int n) {
#ifdef LKV_CUDA
    if (b->gpu) return gpu_pages_needed(b->gpu, r->slot, n);
#endif
    return kv_pages_needed(b->kv, r->slot, r->n_cached + n);
}

/* Pages that the next decode step of each of the n running requests takes, into need[]. On a
 * two-tier cache this decides each head's tier case for the step (kv_plan_step; on the GPU, one
 * kernel for every head of every request), which engine_decode then carries out. */
static void engine_plan(Batch *b, Request **run, int n, int *need) {
#ifdef LKV_CUDA
    if (b->gpu) {
        int slots[n];
        for (int i = 0; i < n; i++) slots[i] = run[i]->slot;
        gpu_plan(b->gpu, n, slots, need);
        return;
    }
#endif
    for (int i = 0; i < n; i++) need[i] = kv_plan_step(b->kv, run[i]->slot, run[i]->n_cached);
}

static int sample_request(Batch *b, Request *r, float *logits) {
    Sampler sp = {b->m->c.vocab_size, r->temperature, b->topp, r->rng, NULL};
    ProbIndex *cand = NULL;
    if (r->temperature > 0 && b->topp > 0 && b->topp < 1) {
        cand = xmalloc(b->m->c.vocab_size * sizeof(ProbIndex));   /* rare path: sampling */
        sp.candidates = cand;
    }
    int next = sample(&sp, logits);
    r->rng = sp.rng;
    free(cand);
    return next;
}

/* runs r's uncached tokens (its prompt, or prompt + generated after a preemption) and
 * samples the token that follows; the caller has checked the pages */
static int engine_prefill(Batch *b, Request *r) {
    int n = r->n_prompt + r->n_gen - r->n_cached, next;
    const int *toks = r->ids + r->n_cached;
    double t0 = now_s();
#ifdef LKV_CUDA
    if (b->gpu) {
        float *lg = r->temperature > 0 ? b->logits : NULL;
        /* a two-tier cache: scores over the prompt's last rows, placement once all are in */
        if (b->gpu_tiers > 1) gpu_begin(b->gpu, r->slot, n, r->alpha_high, r->alpha_low);
        /* only the last row's logits are needed; gpu_prefill gives all rows, so ask for the
         * last token separately when sampling */
        if (lg && n > 1) {
            if (gpu_prefill(b->gpu, r->slot, toks, n - 1, &next, NULL) != 0) die("gpu prefill");
            if (gpu_prefill(b->gpu, r->slot, toks + n - 1, 1, &next, lg) != 0) die("gpu prefill");
        } else if (gpu_prefill(b->gpu, r->slot, toks, n, &next, lg) != 0) die("gpu prefill");
        gpu_place(b->gpu, r->slot);
        if (lg) next = sample_request(b, r, lg);
    } else
#endif
    {
        /* a prompt (or prompt + generated, after a preemption) from position 0: its tokens
         * are placed in the tiers once all are in */
        kv_begin(b->kv, r->slot, n, r->alpha_high, r->alpha_low);
        if (kv_reserve(b->kv, r->slot, r->n_cached + n) != 0) die("internal: prefill pages");
        float *lg = NULL;
        for (int i = 0, chunk = b->m->s.chunk; i < n; i += chunk) {
            int rows = n - i < chunk ? n - i : chunk;
            lg = forward_rows(b->m, b->kv, r->slot, toks + i, rows, r->n_cached + i,
                              i + rows == n);   /* the last chunk: its last row's logits */
        }
        kv_place(b->kv, r->slot);
        next = sample_request(b, r, lg);
    }
    b->t_prefill += now_s() - t0;
    b->n_prefill_tok += n;
    if (r->n_gen > 0) b->n_recomputed += n;   /* back after a preemption: all it had, again */
    r->n_cached += n;
    return next;
}

/* one decode step for n running requests: feeds each one's last token, next[i] gets the
 * token after it; the caller has checked the pages */
static void engine_decode(Batch *b, Request **run, int n, int *next) {
    double t0 = now_s();
#ifdef LKV_CUDA
    if (b->gpu) {
        int slots[n], toks[n], any_sampled = 0;
        for (int i = 0; i < n; i++) {
            slots[i] = run[i]->slot;
            toks[i] = run[i]->ids[run[i]->n_cached];
            any_sampled |= run[i]->temperature > 0;
        }
        float *lg = NULL;
        if (any_sampled) lg = xmalloc((size_t)n * b->m->c.vocab_size * sizeof(float));
        if (gpu_decode(b->gpu, n, slots, toks, next, lg) != 0) die("internal: gpu decode pages");
        for (int i = 0; i < n && lg; i++)
            if (run[i]->temperature > 0)
                next[i] = sample_request(b, run[i], lg + (size_t)i * b->m->c.vocab_size);
        free(lg);
    } else
#endif
    {
        /* run_batch has planned every running request's step (engine_pages_needed) and made
         * sure the pages are there: one take for all of them */
        if (kv_take_planned(b->kv) != 0) die("internal: decode pages");
        for (int i = 0; i < n; i++) {
            Request *r = run[i];
            float *lg = forward(b->m, b->kv, r->slot, r->ids[r->n_cached], r->n_cached);
            next[i] = sample_request(b, r, lg);
        }
    }
    for (int i = 0; i < n; i++) run[i]->n_cached++;
    b->t_decode += now_s() - t0;
    b->n_decode_tok += n;
}

/* frees r's slot; finished: r has ended (not preempted), so what it held counts in the report */
static void engine_release(Batch *b, Request *r, int finished) {
#ifdef LKV_CUDA
    if (b->gpu) {
        if (finished && b->acct) {   /* two tiers: what the slot's heads hold, counted here */
            KVCache *kv = b->acct;
            int heads = kv->n_layers * kv->n_kv_heads, counts[heads * 4];
            gpu_tier_counts(b->gpu, r->slot, counts);
            for (int a = 0; a < heads; a++)
                kv_account_head(kv, a, counts[a * 4], counts[a * 4 + 1],
                                gpu_slot_len(b->gpu, r->slot), counts[a * 4 + 2] + counts[a * 4 + 3]);
        }
        gpu_release(b->gpu, r->slot);
    } else
#endif
    {
        if (finished) kv_account(b->kv, r->slot);
        kv_release(b->kv, r->slot);
    }
    b->slot_free[r->slot] = 1;
    r->slot = -1;
}

/* Preempting r: parks its cache in the swap space (leankv.h 4d) when there is room, so that
 * it resumes instead of being recomputed; 0 when parked. The caller then releases its slot. */
static int engine_swap_out(Batch *b, Request *r) {
    double t0 = now_s();
    int rc;
#ifdef LKV_CUDA
    if (b->gpu) rc = gpu_swap_out(b->gpu, r->slot, &r->parked);
    else
#endif
    rc = kv_swap_out(b->kv, r->slot, &r->parked);
    if (rc == 0) { b->swap_outs++; b->swap_pages += r->parked.n_pages; }
    b->t_swap += now_s() - t0;
    return rc;
}

/* brings parked r back into its (empty) slot: it resumes with every token it had; the caller
 * has checked the pages */
static void engine_swap_in(Batch *b, Request *r) {
    double t0 = now_s();
    int len = r->parked.len, rc;
#ifdef LKV_CUDA
    if (b->gpu) rc = gpu_swap_in(b->gpu, r->slot, &r->parked);
    else
#endif
    rc = kv_swap_in(b->kv, r->slot, &r->parked);
    if (rc != 0) die("internal: swap-in pages");
    r->n_cached = len;   /* its prompt and all it generated but the last token, which the
                            next decode step feeds */
    b->t_swap += now_s() - t0;
}

/* appends a sampled token; returns 1 when the request is finished */
static int request_push(Batch *b, Request *r, int next) {
    const Config *c = &b->m->c;
    if (r->t_first == 0) r->t_first = now_s();
    if (is_stop(c, next) && !r->no_stop) return 1;
    r->ids[r->n_prompt + r->n_gen++] = next;
    return r->n_gen >= r->max_new || r->n_prompt + r->n_gen >= b->ctx;
}

/* Pages that one decode step of one sequence takes, on average. Measured (what the steps so
 * far took, per sequence-step) once they span a page of tokens: fewer steps may all fall inside
 * pages and take none, and no formula fits a two-tier cache, which takes pages by tier case and
 * none for a head that prunes. Until then one tier's rate: a page per (layer, KV head) every
 * tokens_per_page tokens. */
static double step_pages(Batch *b) {
    int tpp = engine_tokens_per_page(b);
    if (b->n_steps >= tpp) return b->step_pages / b->sum_running;
    return (double)b->m->c.n_layers * b->m->c.n_kv_heads / tpp;
}

/* Pages that the admission of r must leave free beyond its own: admit_steps decode steps of
 * every running request and of r, each capped by the tokens it has left (one about to finish
 * grows no further, and then gives its pages back). 0 when nothing runs: alone it may start. */
static double admit_headroom(Batch *b, Request **run, int n_run, const Request *r) {
    if (n_run == 0 || b->admit_steps == 0) return 0;
    long steps = 0;
    for (int i = 0; i <= n_run; i++) {
        const Request *x = i < n_run ? run[i] : r;
        int left = x->max_new - x->n_gen, room = b->ctx - x->n_prompt - x->n_gen;
        if (room < left) left = room;
        steps += left < b->admit_steps ? left : b->admit_steps;
    }
    return ceil(step_pages(b) * steps);
}

/* Runs every request to the end. on_done(r) is called as each one finishes. */
static void run_batch(Batch *b, Request *reqs, int n_req, void (*on_done)(Batch *, Request *)) {
    int *queue = xmalloc((size_t)n_req * sizeof(int));      /* waiting requests, in order */
    int q_head = 0, q_len = n_req, n_done = 0, n_run = 0;
    Request **run = xmalloc((size_t)b->max_batch * sizeof(Request *));
    int *next = xmalloc((size_t)b->max_batch * sizeof(int));
    int *need = xmalloc((size_t)b->max_batch * sizeof(int));   /* pages of each one's step */
    for (int i = 0; i < n_req; i++) queue[i] = i;
    /* the queue is a ring: preempted requests go back to its front */
#define QAT(k) queue[(q_head + (k)) % n_req]
    while (n_done < n_req) {
        /* 1. admission: waiting requests join while a slot and the pages for their tokens
         *    (plus one for the first decode step) are there, and, when others run, pages for
         *    admit_steps decode steps of every running request and the new one beyond those
         *    (admit_headroom).
         *    A preempted request is recomputed from its prompt (or, parked in the swap space,
         *    copied back), so a join that soon runs the pool out costs more than the wait for
         *    a finished request's pages does. */
        while (q_len > 0 && n_run < b->max_batch) {
            Request *r = &reqs[QAT(0)];
            int slot = 0;
            while (!b->slot_free[slot]) slot++;
            r->slot = slot;
            r->n_cached = 0;
            int n_tok = r->n_prompt + r->n_gen, parked = r->parked.n_pages > 0, need;
            if (n_tok + 1 > b->ctx) die("internal: request longer than the context");
            if (parked)   /* its pages, and a page a head for its next step (alone: its pages,
                             which fitted once; the step truncates it if it needs more) */
                need = r->parked.n_pages + (n_run ? b->m->c.n_layers * b->m->c.n_kv_heads : 0);
            else need = engine_pages_needed(b, r, n_tok + 1);
            double headroom = admit_headroom(b, run, n_run, r);
            if (need + headroom > engine_free_pages(b)) {
                r->slot = -1;
                if (n_run == 0) {   /* alone it still does not fit: it never will */
                    r->error = "the KV pool cannot hold this request (raise --kv-mem)";
                    r->state = REQ_DONE;
                    q_head = (q_head + 1) % n_req; q_len--; n_done++;
                    on_done(b, r);
                    continue;
                }
                break;
            }
            q_head = (q_head + 1) % n_req; q_len--;
            b->slot_free[slot] = 0;
            r->state = REQ_RUNNING;
            if (r->t_start == 0) r->t_start = now_s();
            run[n_run++] = r;
            if (parked) { engine_swap_in(b, r); continue; }   /* it resumes at the next step */
            int tok = engine_prefill(b, r);
            if (request_push(b, r, tok)) {   /* done after one token */
                r->state = REQ_DONE; r->t_end = now_s();
                engine_release(b, r, 1); n_run--; n_done++;
                on_done(b, r);
            }
        }
        if (n_run > b->peak_running) b->peak_running = n_run;
        if (n_run == 0) continue;
        /* 2. pages for this step; preempt the newest requests until they suffice */
        engine_plan(b, run, n_run, need);
        long total = 0;
        for (int i = 0; i < n_run; i++) total += need[i];
        for (;;) {
            if (total <= engine_free_pages(b) || n_run == 1) break;
            Request *victim = run[--n_run];
            total -= need[n_run];
            engine_swap_out(b, victim);   /* parked if the swap space has room, else recomputed */
            engine_release(b, victim, 0);
            victim->state = REQ_QUEUED;
            victim->preemptions++;
            b->preemptions++;
            q_head = (q_head + n_req - 1) % n_req; q_len++;
            QAT(0) = (int)(victim - reqs);
        }
        if (n_run == 1 && need[0] > engine_free_pages(b)) {
            /* alone, it outgrew the whole pool: it ends here, truncated, and says so */
            Request *r = run[--n_run];
            r->error = "the KV pool ran out; output truncated (raise --kv-mem)";
            r->state = REQ_DONE; r->t_end = now_s();
            engine_release(b, r, 1); n_done++;
            on_done(b, r);
            continue;
        }
        /* 3. one decode step for everyone running */
        engine_decode(b, run, n_run, next);
        b->sum_running += n_run;
        b->n_steps++;
        b->step_pages += total;
        int used = engine_used_pages(b);
        if (used > b->peak_pages) b->peak_pages = used;
        int kept = 0;
        for (int i = 0; i < n_run; i++) {
            Request *r = run[i];
            if (request_push(b, r, next[i])) {
                r->state = REQ_DONE; r->t_end = now_s();
                engine_release(b, r, 1); n_done++;
                on_done(b, r);
            } else run[kept++] = r;
        }
        n_run = kept;
    }
#undef QAT
    free(queue); free(run); free(next); free(need);
}

/* ----------------------------------------------------------------------------------------
 * Request files: JSONL (one object per line: "prompt", optional "id", "n", "temperature")
 * or plain text (one prompt per line). A small JSON reader: it accepts any valid JSON value
 * for keys it does not know, and says where a line stops being JSON. */

typedef struct {
    const char *p, *end;  /* the unread part of the line */
    const char *err;      /* first error, or NULL */
} Json;

static void json_ws(Json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\r' || *j->p == '\n'))
        j->p++;
}

static int json_fail(Json *j, const char *why) { if (!j->err) j->err = why; return -1; }

static void utf8_put(char **o, unsigned cp) {
    unsigned char *u = (unsigned char *)*o;
    if (cp < 0x80) *u++ = cp;
    else if (cp < 0x800) { *u++ = 0xC0 | cp >> 6; *u++ = 0x80 | (cp & 63); }
    else if (cp < 0x10000) { *u++ = 0xE0 | cp >> 12; *u++ = 0x80 | (cp >> 6 & 63); *u++ = 0x80 | (cp & 63); }
    else { *u++ = 0xF0 | cp >> 18; *u++ = 0x80 | (cp >> 12 & 63); *u++ = 0x80 | (cp >> 6 & 63); *u++ = 0x80 | (cp & 63); }
    *o = (char *)u;
}

static int json_hex4(Json *j, unsigned *v) {
    if (j->end - j->p < 4) return json_fail(j, "short \\u escape");
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return json_fail(j, "bad \\u escape");
        *v = *v << 4 | d;
    }
    return 0;
}

/* a string; *out (malloc'd, NUL-terminated) when out is not NULL */
static int json_string(Json *j, char **out) {
    if (j->p >= j->end || *j->p != '"') return json_fail(j, "expected a string");
    j->p++;
    /* the decoded string is never longer than the escaped one */
    char *buf = out ? xmalloc((size_t)(j->end - j->p) + 1) : NULL, *o = buf;
    while (j->p < j->end && *j->p != '"') {
        unsigned char c = (unsigned char)*j->p++;
        if (c < 0x20) { free(buf); return json_fail(j, "control character in a string"); }
        if (c != '\\') { if (o) *o++ = (char)c; continue; }
        if (j->p >= j->end) break;
        char e = *j->p++;
        unsigned cp = 0;
        switch (e) {
        case '"': cp = '"'; break;   case '\\': cp = '\\'; break; case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;  case 'f': cp = '\f'; break;  case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;  case 't': cp = '\t'; break;
        case 'u':
            if (json_hex4(j, &cp)) { free(buf); return -1; }
            if (cp >= 0xD800 && cp < 0xDC00) {     /* a surrogate pair */
                unsigned lo;
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') cp = 0xFFFD;
                else {
                    j->p += 2;
                    if (json_hex4(j, &lo)) { free(buf); return -1; }
                    cp = lo >= 0xDC00 && lo < 0xE000 ? 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                                                     : 0xFFFD;
                }
            } else if (cp >= 0xDC00 && cp < 0xE000) cp = 0xFFFD;
            break;
        default: free(buf); return json_fail(j, "bad escape in a string");
        }
        if (o) utf8_put(&o, cp);
    }
    if (j->p >= j->end) { free(buf); return json_fail(j, "unterminated string"); }
    j->p++;
    if (o) { *o = 0; *out = buf; }
    return 0;
}

static int json_number(Json *j, double *v) {
    char tmp[64];
    size_t n = 0;
    while (j->p + n < j->end && n < sizeof tmp - 1 && strchr("+-0123456789.eE", j->p[n])) n++;
    memcpy(tmp, j->p, n);
    tmp[n] = 0;
    char *e;
    double x = strtod(tmp, &e);
    if (n == 0 || e != tmp + n || !isfinite(x)) return json_fail(j, "bad number");
    j->p += n;
    if (v) *v = x;
    return 0;
}

/* skips any value, nested at most 64 deep */
static int json_skip(Json *j, int depth) {
    json_ws(j);
    if (depth > 64) return json_fail(j, "nested too deep");
    if (j->p >= j->end) return json_fail(j, "expected a value");
    char c = *j->p;
    if (c == '"') return json_string(j, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        json_ws(j);
        if (j->p < j->end && *j->p == close) { j->p++; return 0; }
        for (;;) {
            if (c == '{') {
                json_ws(j);
                if (json_string(j, NULL)) return -1;
                json_ws(j);
                if (j->p >= j->end || *j->p++ != ':') return json_fail(j, "expected ':'");
            }
            if (json_skip(j, depth + 1)) return -1;
            json_ws(j);
            if (j->p < j->end && *j->p == ',') { j->p++; continue; }
            if (j->p < j->end && *j->p == close) { j->p++; return 0; }
            return json_fail(j, "expected ',' or a closing bracket");
        }
    }
    const char *words[3] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if ((size_t)(j->end - j->p) >= n && !memcmp(j->p, words[i], n)) { j->p += n; return 0; }
    }
    return json_number(j, NULL);
}

/* one request line: fills r's id, prompt, max_new and temperature; returns NULL or why not */
static const char *parse_request_json(const char *line, size_t len, Request *r) {
    Json j = {line, line + len, NULL};
    json_ws(&j);
    if (j.p >= j.end || *j.p++ != '{') return "not a JSON object";
    json_ws(&j);
    if (j.p < j.end && *j.p == '}') { j.p++; }
    else for (;;) {
        char *key = NULL;
        json_ws(&j);
        if (json_string(&j, &key)) break;
        json_ws(&j);
        if (j.p >= j.end || *j.p++ != ':') { free(key); json_fail(&j, "expected ':'"); break; }
        json_ws(&j);
        double v;
        if (!strcmp(key, "prompt")) {
            free(r->prompt); r->prompt = NULL;
            if (json_string(&j, &r->prompt)) { free(key); break; }
        } else if (!strcmp(key, "id")) {
            free(r->id); r->id = NULL;
            if (j.p < j.end && *j.p == '"') { if (json_string(&j, &r->id)) { free(key); break; } }
            else {
                const char *s = j.p;
                if (json_number(&j, NULL)) { free(key); break; }
                r->id = strndup(s, (size_t)(j.p - s));
            }
        } else if (!strcmp(key, "n")) {
            if (json_number(&j, &v)) { free(key); break; }
            /* the range first: converting a double beyond int's range is undefined */
            if (!(v >= 1 && v <= 1e7) || v != floor(v)) {
                free(key); json_fail(&j, "\"n\" must be an integer in [1, 10000000]"); break;
            }
            r->max_new = (int)v;
        } else if (!strcmp(key, "temperature")) {
            if (json_number(&j, &v)) { free(key); break; }
            if (v < 0 || v > 100) { free(key); json_fail(&j, "\"temperature\" must be in [0, 100]"); break; }
            r->temperature = (float)v;
        } else if (!strcmp(key, "alpha_high") || !strcmp(key, "alpha_low")) {
            if (json_number(&j, &v)) { free(key); break; }
            *(key[6] == 'h' ? &r->alpha_high : &r->alpha_low) = (float)v;
        } else if (json_skip(&j, 0)) { free(key); break; }
        free(key);
        json_ws(&j);
        if (j.p < j.end && *j.p == ',') { j.p++; continue; }
        if (j.p < j.end && *j.p == '}') { j.p++; break; }
        json_fail(&j, "expected ',' or '}'");
        break;
    }
    if (j.err) return j.err;
    json_ws(&j);
    if (j.p != j.end) return "text after the object";
    if (!r->prompt) return "no \"prompt\"";
    if (!(r->alpha_low >= 0 && r->alpha_high >= r->alpha_low))
        return "\"alpha_high\" and \"alpha_low\" must satisfy alpha_high >= alpha_low >= 0";
    return NULL;
}

/* writes s as a JSON string; invalid UTF-8 becomes U+FFFD so the line stays valid JSON */
static void json_write_string(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (c >= 0x80 && (i + k > n || first_invalid_utf8(s + i, k))) { fputs("\\ufffd", f); i++; }
        else if (c == '"' || c == '\\') { fputc('\\', f); fputc(c, f); i++; }
        else if (c == '\n') { fputs("\\n", f); i++; }
        else if (c == '\t') { fputs("\\t", f); i++; }
        else if (c < 0x20 || c == 0x7f) { fprintf(f, "\\u%04x", c); i++; }
        else { fwrite(s + i, 1, k, f); i += k; }
    }
    fputc('"', f);
}

/* one JSONL line per finished request, on stdout */
static void print_request(Batch *b, Request *r) {
    printf("{\"id\":");
    json_write_string(stdout, r->id, strlen(r->id));
    printf(",\"prompt_tokens\":%d,\"text\":", r->n_prompt);
    size_t cap = 64, len = 0;
    char *text = xmalloc(cap);
    for (int i = 0; i < r->n_gen && b->m->tok; i++) {
        int n;
        const char *p = tokenizer_piece(b->m->tok, r->ids[r->n_prompt + i], &n);
        if (len + n + 1 > cap) { cap = 2 * (len + n + 1); text = realloc(text, cap); if (!text) die("oom"); }
        memcpy(text + len, p, n);
        len += n;
    }
    json_write_string(stdout, text, len);
    free(text);
    double decode_s = r->t_end - r->t_first;
    printf(",\"generated_tokens\":%d,\"ttft_ms\":%.1f,\"decode_tok_s\":%.1f,\"preemptions\":%d",
           r->n_gen, r->t_first > 0 ? 1e3 * (r->t_first - r->t_start) : 0.0,
           r->n_gen > 1 && decode_s > 0 ? (r->n_gen - 1) / decode_s : 0.0, r->preemptions);
    if (r->error) { printf(",\"error\":"); json_write_string(stdout, r->error, strlen(r->error)); }
    printf("}\n");
    fflush(stdout);
}

static void quiet_done(Batch *b, Request *r) { (void)b; (void)r; }

static void free_requests(Request *reqs, int n) {
    for (int i = 0; i < n; i++) { free(reqs[i].id); free(reqs[i].prompt); free(reqs[i].ids); }
    free(reqs);
}

/* -f FILE's text: JSONL requests, or one prompt per line. Returns the requests, or NULL with
 * the reason ("FILE:LINE: why") in err, having freed everything. */
static Request *parse_requests(Model *m, const Options *o, const char *text, size_t len,
                               int *n_out, char *err, size_t errlen) {
    const char *p = text;
    while (p < text + len && isspace((unsigned char)*p)) p++;
    int jsonl = p < text + len && *p == '{';
    int cap = 16, n = 0, line_no = 0;
    Tokenizer *tok = need_tokenizer(m);
    Request *reqs = xmalloc(cap * sizeof(Request));
    int *scratch = xmalloc((size_t)o->ctx * sizeof(int));   /* one prompt's ids */
    for (const char *line = text; line < text + len;) {
        const char *nl = memchr(line, '\n', (size_t)(text + len - line));
        const char *end = nl ? nl : text + len;
        line_no++;
        size_t ll = (size_t)(end - line);
        if (ll && line[ll - 1] == '\r') ll--;
        int blank = 1;
        for (size_t i = 0; i < ll; i++) if (!isspace((unsigned char)line[i])) { blank = 0; break; }
        if (!blank) {
            if (n == cap) {
                Request *more = realloc(reqs, 2 * cap * sizeof(Request));
                if (!more) { free_requests(reqs, n); free(scratch); die("out of memory reading %d requests", n); }
                reqs = more;
                cap *= 2;
            }
            Request *r = &reqs[n++];
            memset(r, 0, sizeof *r);
            r->max_new = o->steps > 0 ? o->steps : o->ctx;
            r->temperature = o->temperature;
            r->alpha_high = o->policy.alpha_high;
            r->alpha_low = o->policy.alpha_low;
            r->no_stop = o->no_stop;
            r->slot = -1;
            if (jsonl) {
                const char *why = parse_request_json(line, ll, r);
                if (why) {
                    snprintf(err, errlen, "%s:%d: %s", o->file, line_no, why);
                    free_requests(reqs, n);
                    free(scratch);
                    return NULL;
                }
            } else r->prompt = strndup(line, ll);
            if (!r->id) { char buf[32]; snprintf(buf, sizeof buf, "%d", n); r->id = strdup(buf); }
            r->rng = o->seed + (uint64_t)n * 0x9E3779B97F4A7C15ull;
            size_t pl = strlen(r->prompt);
            if (first_invalid_utf8(r->prompt, pl)) r->error = "invalid UTF-8 in the prompt";
            else {
                int k = 0;
                if (m->c.add_bos && m->c.bos_id >= 0) scratch[k++] = m->c.bos_id;
                int e = tokenizer_encode(tok, r->prompt, pl, scratch + k, o->ctx - k);
                if (e < 0 || k + e >= o->ctx) r->error = "the prompt does not fit the context (--ctx)";
                else if (k + e == 0) r->error = "the prompt is empty";
                else r->n_prompt = k + e;
            }
            if (!r->error) {   /* room for the prompt and what request_push() may append */
                int room = r->max_new < o->ctx - r->n_prompt ? r->max_new : o->ctx - r->n_prompt;
                r->ids = xmalloc((size_t)(r->n_prompt + room) * sizeof(int));
                memcpy(r->ids, scratch, (size_t)r->n_prompt * sizeof(int));
            }
        }
        line = nl ? nl + 1 : text + len;
    }
    free(scratch);
    if (n == 0) {
        snprintf(err, errlen, "%s holds no request", o->file);
        free_requests(reqs, n);
        return NULL;
    }
    *n_out = n;
    return reqs;
}

/* -f FILE: JSONL requests, or one prompt per line */
static Request *read_requests(Model *m, const Options *o, int *n_out) {
    size_t len;
    char *text = read_file(o->file, &len);
    char err[256];
    Request *reqs = parse_requests(m, o, text, len, n_out, err, sizeof err);
    free(text);
    if (!reqs) die("%s", err);
    return reqs;
}

static const char *device_line;   /* "device: ...", said once the input has been read */

/* the engine for this run: the CPU cache, or the GPU */
static void build_batch(Batch *b, Model *m, KVCache *kv, const Options *o, int use_gpu) {
    if (device_line) fprintf(stderr, "%s\n", device_line);
    memset(b, 0, sizeof *b);
    b->m = m; b->ctx = o->ctx; b->topp = o->topp;
    b->max_batch = o->batch;
    b->admit_steps = o->admit_steps;
    b->kv_map = o->kv_map;
    b->slot_free = xmalloc(b->max_batch * sizeof(int));
    for (int i = 0; i < b->max_batch; i++) b->slot_free[i] = 1;
    b->logits = xmalloc(m->c.vocab_size * sizeof(float));
    if (use_gpu) {
        char err[256];
        LkvPrecision tiers[2] = {o->kv, o->kv_low};
        b->gpu = gpu_build(&m->c, &m->w, tiers, o->kv_tiers, o->policy, b->max_batch, o->prefill_chunk, o->ctx,
                           o->kv_mem_mib, err, sizeof err);
        if (!b->gpu) die("cuda: %s", err);
        if (gpu_build_swap(b->gpu, o->swap_mib, err, sizeof err) != 0) die("cuda: %s", err);
        b->gpu_tiers = o->kv_tiers;
        if (o->kv_tiers > 1) {   /* the report's counts, kept by a one-slot cache of 1 MiB */
            build_kvcache_tiers(kv, &m->c, 1, 64, 1, tiers, 2);
            kv->defaults = o->policy;
            kv_describe_policy(kv, stderr);
            b->acct = kv;
        }
    } else {
        build_cache(kv, &m->c, b->max_batch, o);
        build_swap(&kv->swap, o->swap_mib, kv->page_bytes);
        b->kv = b->acct = kv;
    }
}

/* the closing report of the CPU cache (every run), and --kv-map */
static void finish_cache(KVCache *kv, const char *map) {
    kv_report(kv, stderr);
    if (map) kv_write_map(kv, map);
}

static void free_batch(Batch *b) {
    if (b->gpu) gpu_free(b->gpu);
    if (b->acct) free_kvcache(b->acct);
    free(b->slot_free);
    free(b->logits);
}

/* sequences in flight, on average over the decode steps */
static double mean_running(const Batch *b) { return b->n_steps ? b->sum_running / b->n_steps : 0.0; }

static void print_summary(Batch *b, Request *reqs, int n, double wall) {
    long gen = 0, prompt = 0;
    int failed = 0;
    for (int i = 0; i < n; i++) { gen += reqs[i].n_gen; prompt += reqs[i].n_prompt; failed += !!reqs[i].error; }
    fprintf(stderr, "summary: %d requests (%d failed), %ld prompt + %ld generated tokens in %.2f s: "
            "prefill %.1f tok/s, decode %.1f tok/s, total %.1f tok/s; peak %d sequences in flight "
            "(mean %.1f), peak %d KV pages; %d preemptions (%d parked in swap space, %ld tokens "
            "recomputed)\n", n, failed, prompt, gen, wall, b->n_prefill_tok / (b->t_prefill + 1e-9),
            b->n_decode_tok / (b->t_decode + 1e-9), (prompt + gen) / (wall + 1e-9),
            b->peak_running, mean_running(b), b->peak_pages, b->preemptions, b->swap_outs,
            b->n_recomputed);
}

static void mode_serve(Model *m, const Options *o, int use_gpu) {
    int n;
    Request *reqs = read_requests(m, o, &n);
    KVCache kv;
    Batch b;
    build_batch(&b, m, &kv, o, use_gpu);
    /* requests refused at reading are reported first */
    int n_ok = 0;
    for (int i = 0; i < n; i++) {
        if (reqs[i].error) {   /* reported now, then dropped */
            print_request(&b, &reqs[i]);
            free(reqs[i].id); free(reqs[i].prompt); free(reqs[i].ids);
        } else reqs[n_ok++] = reqs[i];
    }
    double t0 = now_s();
    run_batch(&b, reqs, n_ok, print_request);
    if (b.acct) finish_cache(b.acct, b.kv_map);
    print_summary(&b, reqs, n_ok, now_s() - t0);   /* the last line */
    free_batch(&b);
    free_requests(reqs, n_ok);
}

static void print_generated(Batch *b, Request *r) {
    for (int i = 0; i < r->n_gen; i++) print_token(b->m, r->ids[r->n_prompt + i]);
    printf("\n");
    if (r->error) fprintf(stderr, "leankv: %s\n", r->error);
    if (b->print_ids)
        for (int i = 0; i < r->n_gen; i++) printf("%d%s", r->ids[r->n_prompt + i], i + 1 < r->n_gen ? " " : "\n");
    fprintf(stderr, "prompt: %d tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n", r->n_prompt,
            r->n_prompt / (b->t_prefill + 1e-9), r->n_gen,
            r->n_gen > 1 ? (r->n_gen - 1) / (r->t_end - r->t_first + 1e-9) : 0.0);
}

/* generate mode on the GPU: one request through the batch engine */
static void mode_generate_batched(Model *m, const Options *o, int use_gpu) {
    const char *prompt = o->prompt ? o->prompt : "";
    Request r = {0};
    r.id = strdup("0");
    r.ids = xmalloc((size_t)(o->ctx + 1) * sizeof(int));
    r.n_prompt = encode_text(m, prompt, strlen(prompt), r.ids, o->ctx, "the prompt");
    if (r.n_prompt == 0) die("the prompt is empty and the model has no BOS token to start from");
    if (r.n_prompt >= o->ctx) die("the prompt has %d tokens; the context (--ctx) is %d", r.n_prompt, o->ctx);
    r.max_new = o->steps > 0 ? o->steps : o->ctx;
    r.temperature = o->temperature;
    r.alpha_high = o->policy.alpha_high;
    r.alpha_low = o->policy.alpha_low;
    r.no_stop = o->no_stop;
    r.rng = o->seed;
    r.slot = -1;
    KVCache kv;
    Batch b;
    Options one = *o;
    one.batch = 1;
    build_batch(&b, m, &kv, &one, use_gpu);
    b.print_ids = o->print_ids;
    fwrite(prompt, 1, strlen(prompt), stdout);
    run_batch(&b, &r, 1, print_generated);
    if (b.acct) finish_cache(b.acct, b.kv_map);
    free_batch(&b);
    free(r.id); free(r.ids);
}

/* -m bench: synthetic requests of random ids, forced output length */
static void mode_bench(Model *m, const Options *o, int use_gpu) {
    int n = o->requests > 0 ? o->requests : o->batch;
    if (o->prompt_len + o->gen_len > o->ctx)
        die("--prompt-len %d + --gen-len %d exceed the context (--ctx) of %d", o->prompt_len,
            o->gen_len, o->ctx);
    Request *reqs = xmalloc((size_t)n * sizeof(Request));
    uint64_t rng = o->seed;
    for (int i = 0; i < n; i++) {
        Request *r = &reqs[i];
        char buf[32];
        snprintf(buf, sizeof buf, "%d", i);
        r->id = strdup(buf);
        r->ids = xmalloc((size_t)(o->prompt_len + o->gen_len + 1) * sizeof(int));
        for (int k = 0; k < o->prompt_len; k++)
            r->ids[k] = (int)(random_f32(&rng) * m->c.vocab_size) % m->c.vocab_size;
        r->n_prompt = o->prompt_len;
        r->max_new = o->gen_len;
        r->no_stop = 1;
        r->slot = -1;
        r->rng = rng;
        r->alpha_high = o->policy.alpha_high;
        r->alpha_low = o->policy.alpha_low;
    }
    KVCache kv;
    Batch b;
    build_batch(&b, m, &kv, o, use_gpu);
    /* warm-up, untimed: one batch of the same shape generating 4 tokens, so that one-time
     * costs (CUDA graph capture, first touches of memory) stay out of the figures */
    int n_warm = n < o->batch ? n : o->batch;
    Request *warm = xmalloc((size_t)n_warm * sizeof(Request));
    for (int i = 0; i < n_warm; i++) {
        warm[i] = reqs[i];
        warm[i].ids = xmalloc((size_t)(o->prompt_len + 5) * sizeof(int));
        memcpy(warm[i].ids, reqs[i].ids, (size_t)o->prompt_len * sizeof(int));
        warm[i].id = NULL; warm[i].prompt = NULL;
        warm[i].max_new = 4;
    }
    run_batch(&b, warm, n_warm, quiet_done);
    free_requests(warm, n_warm);
    if (b.acct) kv_account_reset(b.acct);
    b.t_prefill = b.t_decode = 0;
    b.n_prefill_tok = b.n_decode_tok = b.n_recomputed = 0;
    b.peak_running = b.peak_pages = b.preemptions = b.swap_outs = 0;
    b.swap_pages = 0; b.t_swap = 0;
    /* the growth estimate too: the warm-up's 4 steps may all fall inside pages */
    b.sum_running = 0; b.n_steps = 0; b.step_pages = 0;
    double t0 = now_s();
    run_batch(&b, reqs, n, quiet_done);
    double wall = now_s() - t0;
    if (b.acct) finish_cache(b.acct, b.kv_map);
    long gen = (long)n * o->gen_len, prompt = (long)n * o->prompt_len;
    double pf = b.n_prefill_tok / (b.t_prefill + 1e-9), dc = b.n_decode_tok / (b.t_decode + 1e-9);
    printf("bench: %s, %d requests, batch %d, prompt %d, generate %d\n",
           use_gpu ? "cuda" : "cpu", n, o->batch, o->prompt_len, o->gen_len);
    double mean_seqs = mean_running(&b);
    printf("prefill %.1f tok/s, decode %.1f tok/s, total %.1f tok/s, peak %d sequences in flight "
           "(mean %.1f), peak %d KV pages, %d preemptions, %.2f s\n", pf, dc, (prompt + gen) / wall,
           b.peak_running, mean_seqs, b.peak_pages, b.preemptions, wall);
    printf("time: prefill %.2f s for %ld tokens (%ld of them recomputed after preemptions), "
           "decode %.2f s for %ld tokens, swap %.2f s for %d sequences parked (%ld pages) and "
           "brought back\n", b.t_prefill, b.n_prefill_tok, b.n_recomputed, b.t_decode,
           b.n_decode_tok, b.t_swap, b.swap_outs, b.swap_pages);
    printf("{\"device\":\"%s\",\"requests\":%d,\"batch\":%d,\"prompt_len\":%d,\"gen_len\":%d,"
           "\"prefill_tok_s\":%.1f,\"decode_tok_s\":%.1f,\"total_tok_s\":%.1f,\"peak_seqs\":%d,"
           "\"mean_seqs\":%.1f,\"peak_pages\":%d,\"preemptions\":%d,\"admit_steps\":%d,"
           "\"seconds\":%.3f,\"prefill_s\":%.3f,\"decode_s\":%.3f,\"prefill_tokens\":%ld,"
           "\"decode_tokens\":%ld,\"recomputed_tokens\":%ld,\"swap_mib\":%zu,\"swap_outs\":%d,"
           "\"swap_s\":%.3f}\n",
           use_gpu ? "cuda" : "cpu", n, o->batch, o->prompt_len, o->gen_len, pf, dc,
           (prompt + gen) / wall, b.peak_running, mean_seqs, b.peak_pages, b.preemptions,
           o->admit_steps, wall, b.t_prefill, b.t_decode, b.n_prefill_tok, b.n_decode_tok,
           b.n_recomputed, o->swap_mib, b.swap_outs, b.t_swap);
    free_batch(&b);
    free_requests(reqs, n);
}

/* ----------------------------------------------------------------------------------------
 * Command line */

static void usage(FILE *f) {
    fprintf(f,
        "usage: leankv MODEL.bin [PROMPT] [options]\n"
        "  -m, --mode MODE     generate (default), chat, tokenize, ppl, logits, bench, passkey\n"
        "  -i, --input TEXT    the prompt (or, for -m logits, space-separated token ids)\n"
        "  -n, --steps N       tokens to generate, 0 = up to the context (default 256)\n"
        "  -t, --temperature T 0 = greedy (default 1.0)\n"
        "  -p, --topp P        nucleus sampling threshold in (0, 1] (default 0.9)\n"
        "  -s, --seed S        random seed (default: time)\n"
        "  -y, --system TEXT   system prompt for chat mode\n"
        "  -z, --tokenizer F   llama2.c tokenizer.bin (for legacy checkpoints)\n"
        "  -f, --file F        text file for -m ppl; for generate, requests: JSONL lines\n"
        "                      {\"prompt\", \"id\", \"n\", \"temperature\", \"alpha_high\",\n"
        "                      \"alpha_low\"} or one prompt a line\n"
        "  -o, --out F         output file for -m logits\n"
        "      --ctx N         context length (default: the model's, at most 4096)\n"
        "      --kv-mem MIB    KV page pool size in MiB (default: enough for the context)\n"
        "      --kv TYPE       KV cache: fp16 (default), fp32 (exact, for checks), kXvY (keys at\n"
        "                      X bits, values at Y, X and Y in 16, 8, 4, 2: k8v4, k4v2), leankv\n"
        "      --kv-groups G   channel groups per head vector, each with its scale/zero (1)\n"
        "      --kv leankv     three tiers per head (high, low, pruned) chosen by attention:\n"
        "      --kv-high TYPE  its high tier (k8v4)     --kv-low TYPE  its low tier (k4v2)\n"
        "      --alpha-high A  below A/n a token leaves the high tier (1.0)\n"
        "      --alpha-low A   below A/n a token is pruned (0.02); requests may carry their own\n"
        "      --kv-window N   the most recent tokens, never compressed (64)\n"
        "      --kv-map FILE   after the run, a PNG of the tier fractions per layer and KV head\n"
        "      --ref TYPE      ppl: also run this cache; print KL divergence, top-1 agreement\n"
        "      --ppl-prefill N ppl: tokens fed as a prompt before decoding one by one (512)\n"
        "      --ctx-len N     passkey: context length of each trial (1024)\n"
        "      --trials N      passkey: trials at each depth 10%%..90%% (5)\n"
        "      --print-ids     print generated token ids instead of text\n"
        "      --no-stop       generate exactly -n tokens, ignoring stop tokens\n"
        "      --device D      auto (GPU when present), cpu or cuda (default auto); the GPU\n"
        "                      keeps fp16, kXvY with X >= Y and leankv of such tiers; auto\n"
        "                      leaves the rest to the CPU\n"
        "      --batch N       sequences in flight at most (default: cpu 8, cuda 256)\n"
        "      --requests N    bench: requests (default: --batch)\n"
        "      --prompt-len N  bench: prompt tokens (default 128)\n"
        "      --gen-len N     bench: generated tokens (default 128)\n"
        "      --admit-steps N -f, bench: a request joins running ones only when the pool has\n"
        "                      room for N more decode steps of them all, itself included\n"
        "                      (or for what each has left, if less);\n"
        "                      0 = as soon as its prompt fits (default %d)\n"
        "      --prefill-chunk N  prompt tokens per forward pass (cpu %d, at most %d;\n"
        "                      cuda %d, at most %d); 1 feeds them one by one on the CPU,\n"
        "                      the path the chunked one is tested against\n"
        "      --swap-mem MIB  -f, bench: host memory that a preempted request's pages are\n"
        "                      parked in, to resume it later instead of computing it again\n"
        "                      from its prompt (default 0: recompute)\n"
        "  -h, --help          this help\n"
        "Environment, GPU, to measure one path against another: LEANKV_MATVEC=0 (cuBLAS, not\n"
        "matvec, for an engine of --batch 1 or 2), LEANKV_PDL=0 (no overlapped launches),\n"
        "LEANKV_ATT_SIMT=1 (no tensor cores in attention), LEANKV_ATT_STAGES=2 or 3 (chunks a\n"
        "warp of tensor-core attention keeps in flight, plus one), LEANKV_TIER_KERNELS=1\n"
        "(--kv leankv: the token write and the scores in kernels of their own),\n"
        "LEANKV_KEEP_SM=0 (--kv leankv: the step's scores in global, not shared, memory),\n"
        "LEANKV_PREFILL_ROWS=1 (a prompt's rows each through the decode kernel),\n"
        "LEANKV_SPLIT_PAGES=N (attention splits of N pages, kept within the engine's bounds;\n"
        "not a positive number: a warning, and the engine's own choice).\n",
        ADMIT_STEPS, CPU_PREFILL_CHUNK, CPU_PREFILL_CHUNK_MAX, GPU_PREFILL_CHUNK,
        GPU_PREFILL_CHUNK_MAX);
}

static long parse_long(const char *s, const char *flag, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || (errno && errno != ERANGE)) die("%s: '%s' is not an integer", flag, s);
    if (errno == ERANGE) die("%s: %s is out of range [%ld, %ld]", flag, s, lo, hi);
    if (v < lo || v > hi) die("%s: %ld is out of range [%ld, %ld]", flag, v, lo, hi);
    return v;
}

static float parse_float(const char *s, const char *flag) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !isfinite(v)) die("%s: '%s' is not a number", flag, s);
    return v;
}

/* --kv: fp16, fp32, or kXvY with X, Y in {16, 8, 4, 2} (keys at X bits, values at Y) */
static LkvPrecision parse_kv(const char *spec, int groups, const char *flag) {
    LkvPrecision p = {16, 16, groups};
    int kb, vb, used = 0;
    if (!strcmp(spec, "fp16")) return p;
    if (!strcmp(spec, "fp32")) { p.kbits = p.vbits = 32; return p; }
    if (sscanf(spec, "k%dv%d%n", &kb, &vb, &used) != 2 || spec[used] ||
        (kb != 16 && kb != 8 && kb != 4 && kb != 2) || (vb != 16 && vb != 8 && vb != 4 && vb != 2))
        die("%s: '%s' is not a cache type (fp16, fp32, or kXvY with X, Y in 16, 8, 4, 2)", flag,
            spec);
    p.kbits = kb;
    p.vbits = vb;
    return p;
}

static void parse_options(Options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->mode = "generate";
    o->temperature = 1.0f;
    o->topp = 0.9f;
    o->steps = 256;
    o->ctx = -1;
    o->kv_name = "fp16";
    o->device = "auto";
    o->ppl_prefill = 512;
    o->ctx_len = 1024;
    o->trials = 5;
    int groups = 1;
    const char *kv_high = NULL, *kv_low = NULL;
    int alphas_given = 0, window_given = 0;
    o->policy = (LkvPolicy){1.0f, 0.02f, 64, 0};   /* LEANKV.md section 4's defaults */
    o->prompt_len = 128;
    o->gen_len = 128;
    o->admit_steps = ADMIT_STEPS;
    o->prefill_chunk = 0;   /* the device's default, once it is known */
    int seed_given = 0;
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'},   {"input", required_argument, 0, 'i'},
        {"steps", required_argument, 0, 'n'},  {"temperature", required_argument, 0, 't'},
        {"topp", required_argument, 0, 'p'},   {"seed", required_argument, 0, 's'},
        {"system", required_argument, 0, 'y'}, {"tokenizer", required_argument, 0, 'z'},
        {"file", required_argument, 0, 'f'},   {"out", required_argument, 0, 'o'},
        {"ctx", required_argument, 0, 1000},   {"kv-mem", required_argument, 0, 1001},
        {"print-ids", no_argument, 0, 1002},   {"kv", required_argument, 0, 1003},
        {"no-stop", no_argument, 0, 1004},     {"device", required_argument, 0, 1005},
        {"batch", required_argument, 0, 1006}, {"requests", required_argument, 0, 1007},
        {"prompt-len", required_argument, 0, 1008}, {"gen-len", required_argument, 0, 1009},
        {"kv-groups", required_argument, 0, 1010}, {"ref", required_argument, 0, 1011},
        {"ppl-prefill", required_argument, 0, 1012}, {"ctx-len", required_argument, 0, 1013},
        {"trials", required_argument, 0, 1014}, {"admit-steps", required_argument, 0, 1015},
        {"prefill-chunk", required_argument, 0, 1030}, {"swap-mem", required_argument, 0, 1031},
        {"kv-high", required_argument, 0, 1040}, {"kv-low", required_argument, 0, 1041},
        {"alpha-high", required_argument, 0, 1042}, {"alpha-low", required_argument, 0, 1043},
        {"kv-window", required_argument, 0, 1044}, {"kv-map", required_argument, 0, 1045},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, ":m:i:n:t:p:s:y:z:f:o:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm': o->mode = optarg; break;
        case 'i': o->prompt = optarg; break;
        case 'n': o->steps = (int)parse_long(optarg, "-n", 0, INT_MAX / 2); break;
        case 't': o->temperature = parse_float(optarg, "-t");
                  if (o->temperature < 0) die("-t: temperature %g is negative", o->temperature);
                  break;
        case 'p': o->topp = parse_float(optarg, "-p");
                  if (!(o->topp > 0 && o->topp <= 1)) die("-p: top-p %g is outside (0, 1]", o->topp);
                  break;
        case 's': o->seed = (uint64_t)parse_long(optarg, "-s", 0, LONG_MAX); seed_given = 1; break;
        case 'y': o->system = optarg; break;
        case 'z': o->tokenizer_path = optarg; break;
        case 'f': o->file = optarg; break;
        case 'o': o->out = optarg; break;
        case 1000: o->ctx = (int)parse_long(optarg, "--ctx", 1, 1 << 24); break;
        case 1001: o->kv_mem_mib = (size_t)parse_long(optarg, "--kv-mem", 1, 1L << 24); break;
        case 1002: o->print_ids = 1; break;
        case 1004: o->no_stop = 1; break;
        case 1005:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "cuda"))
                die("--device: '%s' is not auto, cpu or cuda", optarg);
            o->device = optarg;
            break;
        case 1006: o->batch = (int)parse_long(optarg, "--batch", 1, 4096); break;
        case 1007: o->requests = (int)parse_long(optarg, "--requests", 1, 1 << 20); break;
        case 1008: o->prompt_len = (int)parse_long(optarg, "--prompt-len", 1, 1 << 24); break;
        case 1009: o->gen_len = (int)parse_long(optarg, "--gen-len", 1, 1 << 24); break;
        case 1003: o->kv_name = optarg; break;
        case 1010: groups = (int)parse_long(optarg, "--kv-groups", 1, 64); break;
        case 1011: o->ref = optarg; break;
        case 1012: o->ppl_prefill = (int)parse_long(optarg, "--ppl-prefill", 0, 1 << 24); break;
        case 1013: o->ctx_len = (int)parse_long(optarg, "--ctx-len", 64, 1 << 24); break;
        case 1014: o->trials = (int)parse_long(optarg, "--trials", 1, 100000); break;
        case 1015: o->admit_steps = (int)parse_long(optarg, "--admit-steps", 0, 1 << 24); break;
        case 1030:
            o->prefill_chunk = (int)parse_long(optarg, "--prefill-chunk", 1, GPU_PREFILL_CHUNK_MAX);
            break;
        case 1031: o->swap_mib = (size_t)parse_long(optarg, "--swap-mem", 0, 1L << 24); break;
        case 1040: kv_high = optarg; break;
        case 1041: kv_low = optarg; break;
        case 1042: o->policy.alpha_high = parse_float(optarg, "--alpha-high"); alphas_given = 1; break;
        case 1043: o->policy.alpha_low = parse_float(optarg, "--alpha-low"); alphas_given = 1; break;
        case 1044: o->policy.window = (int)parse_long(optarg, "--kv-window", 0, 1 << 24);
                   window_given = 1; break;
        case 1045: o->kv_map = optarg; break;
        case 'h': o->help = 1; return;   /* main prints the usage */
        case ':': die("option '%s' needs a value (see --help)", argv[optind - 1]);
        default:
            if (optopt) die("unknown option '-%c' (see --help)", optopt);
            die("unknown option '%s' (see --help)", argv[optind - 1]);
        }
    }
    if (optind >= argc) die("no model file given (usage: leankv MODEL.bin [PROMPT] [options]; "
                            "see --help)");
    o->model_path = argv[optind++];
    if (optind < argc) {
        if (o->prompt) die("the prompt is given twice (-i and a positional argument)");
        o->prompt = argv[optind++];
    }
    if (optind < argc) die("unexpected argument '%s' (quote a prompt with spaces)", argv[optind]);
    if (!seed_given) o->seed = (uint64_t)time(NULL);
    if (!strcmp(o->kv_name, "leankv")) {   /* two tiers and the policy of LEANKV.md 3-4 */
        o->kv_tiers = 2;
        o->kv = parse_kv(kv_high ? kv_high : "k8v4", groups, "--kv-high");
        o->kv_low = parse_kv(kv_low ? kv_low : "k4v2", groups, "--kv-low");
        if (!(o->policy.alpha_low >= 0 && o->policy.alpha_high >= o->policy.alpha_low))
            die("--alpha-high %g and --alpha-low %g must satisfy alpha_high >= alpha_low >= 0",
                o->policy.alpha_high, o->policy.alpha_low);
    } else {
        if (kv_high || kv_low || alphas_given || window_given)
            die("--kv-high, --kv-low, --alpha-high, --alpha-low and --kv-window need --kv leankv");
        o->kv_tiers = 1;
        o->kv = parse_kv(o->kv_name, groups, "--kv");
    }
    if (o->ref) o->ref_kv = parse_kv(o->ref, groups, "--ref");
    const char *modes[] = {"generate", "chat", "tokenize", "ppl", "logits", "bench", "passkey"};
    int ok = 0;
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) ok |= !strcmp(o->mode, modes[i]);
    if (!ok) die("unknown mode '%s' (generate, chat, tokenize, ppl, logits, bench, passkey)",
                 o->mode);
}

/* --device: auto takes the GPU when one is usable; which one it took goes to stderr when
 * the work starts (so that an input error is still the only line) */
static int choose_device(const Options *o, int head_dim, char *what, size_t n) {
    char name[256] = "";
    int have = o->device[1] != 'p' && gpu_available(name, sizeof name);  /* not "cpu" */
    if (!strcmp(o->device, "cuda") && !have) die("--device cuda: no usable GPU (%s)", name);
    const char *refused = lkv_gpu_refuses(o->kv, head_dim);
    if (!refused && o->kv_tiers > 1) refused = lkv_gpu_refuses(o->kv_low, head_dim);
    if (have && refused) {   /* a cache type only the CPU keeps */
        if (!strcmp(o->device, "cuda")) die("--device cuda --kv %s: %s", o->kv_name, refused);
        snprintf(what, n, "device: cpu (--kv %s: %s)", o->kv_name, refused);
        return 0;
    }
    if (have) snprintf(what, n, "device: cuda (%s)", name);
    else snprintf(what, n, "device: cpu%s%s%s", *name ? " (" : "", name, *name ? ")" : "");
    return have;
}

#ifndef TESTING
int main(int argc, char **argv) {
    Options o;
    parse_options(&o, argc, argv);
    if (o.help) { usage(stdout); return 0; }
    build_h2f_table();
    Model m;
    build_model(&m, o.model_path, o.tokenizer_path);
    if (o.ctx > m.c.seq_len)
        die("--ctx %d exceeds the model's context of %d", o.ctx, m.c.seq_len);
    if (o.ctx < 0) o.ctx = m.c.seq_len < 4096 ? m.c.seq_len : 4096;
    /* a quantized head vector is split into --kv-groups equal groups of channels */
    if (m.c.head_dim % o.kv.groups)
        die("--kv-groups %d does not divide the model's head dim of %d", o.kv.groups,
            m.c.head_dim);
    char device[300];
    int batched = !strcmp(o.mode, "bench") || (!strcmp(o.mode, "generate") && o.file);
    int gpu = 0;
    if (batched || !strcmp(o.mode, "generate")) gpu = choose_device(&o, m.c.head_dim, device, sizeof device);
    else if (!strcmp(o.device, "cuda")) die("-m %s runs on the CPU only", o.mode);
    /* the CPU keeps a chunk's scores over the whole context (RunState.att): 1024 rows at most */
    if (o.prefill_chunk == 0) o.prefill_chunk = gpu ? GPU_PREFILL_CHUNK : CPU_PREFILL_CHUNK;
    if (!gpu && o.prefill_chunk > CPU_PREFILL_CHUNK_MAX)
        die("--prefill-chunk %d: the CPU takes at most %d", o.prefill_chunk, CPU_PREFILL_CHUNK_MAX);
    build_runstate(&m, o.ctx, gpu ? CPU_PREFILL_CHUNK : o.prefill_chunk);
    if (o.batch == 0) o.batch = gpu ? 256 : 8;
    if (!gpu && o.kv_mem_mib > memory_bytes() >> 20)   /* on the GPU, its memory says */
        die("--kv-mem %zu MiB is more than this machine's memory (%zu MiB)", o.kv_mem_mib,
            memory_bytes() >> 20);
    if (o.swap_mib > memory_bytes() >> 20)   /* host memory on either device */
        die("--swap-mem %zu MiB is more than this machine's memory (%zu MiB)", o.swap_mib,
            memory_bytes() >> 20);
    if (batched) {
        device_line = device;
        if (!strcmp(o.mode, "bench")) mode_bench(&m, &o, gpu);
        else mode_serve(&m, &o, gpu);
    } else if (!strcmp(o.mode, "tokenize")) {
        mode_tokenize(&m, &o);
    } else {
        if (gpu) {   /* a single prompt on the GPU is a batch of one */
            device_line = device;
            mode_generate_batched(&m, &o, gpu);
            free_runstate(&m.s);
            free_model(&m);
            return 0;
        }
        KVCache kv;
        build_cache(&kv, &m.c, 1, &o);
        Sampler sp;
        build_sampler(&sp, m.c.vocab_size, o.temperature, o.topp, o.seed);
        if (!strcmp(o.mode, "generate")) mode_generate(&m, &kv, &sp, &o);
        else if (!strcmp(o.mode, "chat")) mode_chat(&m, &kv, &sp, &o);
        else if (!strcmp(o.mode, "ppl")) mode_ppl(&m, &kv, &o);
        else if (!strcmp(o.mode, "logits")) mode_logits(&m, &kv, &o);
        else if (!strcmp(o.mode, "passkey")) mode_passkey(&m, &kv, &o);
        finish_cache(&kv, o.kv_map);
        free_sampler(&sp);
        free_kvcache(&kv);
    }
    free_runstate(&m.s);
    free_model(&m);
    return 0;
}
#endif
