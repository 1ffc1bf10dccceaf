/* leankv.h: what the C side (leankv.c, tokenizer.c) and the CUDA side (leankv.cu) share.
 *
 *   1. the model.bin file format (written by export.py, read by leankv.c)
 *   2. the tokenizer interface (tokenizer.c)
 *   3. fp16 <-> fp32 conversion, bit-exact on host and device
 *   4. the page layout of the KV cache (../shared/LEANKV.md section 5)
 *   4b. quantization of a head vector (../shared/LEANKV.md section 2)
 *   4c. tiers: significance, placement and the decode policy (sections 3, 4 and 6)
 *   4d. swap space: a preempted sequence's pages parked in host memory
 *
 * Every formula that both sides need lives here once, as static inline functions that nvcc
 * compiles for the device too (LKV_HD). */
#ifndef LEANKV_H
#define LEANKV_H

#include <stdint.h>
#include <stddef.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#define LKV_HD __host__ __device__ __forceinline__
#else
#define LKV_HD static inline
#endif

/* ----------------------------------------------------------------------------------------
 * 1. model.bin
 *
 * Little-endian throughout. Layout of the file:
 *
 *   [0, 256)                 LkvHeader (below), zero-padded to 256 bytes
 *   [tensor_table_offset..)  n_tensors x LkvTensorEntry (96 bytes each)
 *   [tokenizer_offset..)     tokenizer section, tokenizer_bytes long (may be 0: no tokenizer)
 *   tensor data              each tensor at a 64-byte-aligned offset given in its entry
 *   file_bytes               the total size of the file, checked on load
 *
 * Tensor names and shapes (row-major, shape[0] is the outermost dimension; matrices are
 * stored [out, in] so that y = W x reads W row by row). L = layer index:
 *   tok_embeddings         [vocab, dim]
 *   layers.L.attn_norm     [dim]                     always fp32
 *   layers.L.wq            [n_heads*head_dim, dim]
 *   layers.L.wk            [n_kv_heads*head_dim, dim]
 *   layers.L.wv            [n_kv_heads*head_dim, dim]
 *   layers.L.bq/bk/bv      [rows of wq/wk/wv]        only if qkv_bias; always fp32
 *   layers.L.wo            [dim, n_heads*head_dim]
 *   layers.L.ffn_norm      [dim]                     always fp32
 *   layers.L.w1            [hidden_dim, dim]         gate
 *   layers.L.w2            [dim, hidden_dim]         down
 *   layers.L.w3            [hidden_dim, dim]         up
 *   norm                   [dim]                     always fp32
 *   output                 [vocab, dim]              only if !tied_classifier
 *   chat.system            [nbytes] U8               optional: the UTF-8 system message the
 *                                                    chat template adds when a conversation
 *                                                    has none (SmolLM2's does)
 * Matrices and the embedding are stored in weight_dtype (fp32 or fp16).
 *
 * q and k rows of each head are stored so that rotary pairs are as rope_style says:
 *   LKV_ROPE_INTERLEAVED: channels (2i, 2i+1) rotate together (llama2.c, GGUF llama)
 *   LKV_ROPE_HALF:        channels (i, i + head_dim/2) rotate together (HF "rotate_half")
 * ---------------------------------------------------------------------------------------- */

#define LKV_MAGIC   0x4D564B4Cu   /* the bytes "LKVM" */
#define LKV_VERSION 1
#define LKV_HEADER_BYTES 256
#define LKV_TENSOR_NAME_MAX 64
#define LKV_MAX_STOP 8

enum { LKV_DTYPE_F32 = 0, LKV_DTYPE_F16 = 1, LKV_DTYPE_U8 = 2 };
enum { LKV_ROPE_INTERLEAVED = 0, LKV_ROPE_HALF = 1 };
enum { LKV_CHAT_NONE = 0, LKV_CHAT_CHATML = 1, LKV_CHAT_LLAMA2 = 2, LKV_CHAT_LLAMA3 = 3 };

/* byte offsets are fixed: every field is 4 bytes except the four uint64 at the end */
typedef struct {
    uint32_t magic;               /* @0   LKV_MAGIC */
    int32_t version;              /* @4   LKV_VERSION */
    int32_t dim;                  /* @8   model width */
    int32_t hidden_dim;           /* @12  FFN width */
    int32_t n_layers;             /* @16 */
    int32_t n_heads;              /* @20  query heads */
    int32_t n_kv_heads;           /* @24  key/value heads (GQA when < n_heads) */
    int32_t head_dim;             /* @28 */
    int32_t vocab_size;           /* @32 */
    int32_t seq_len;              /* @36  the model's trained context length */
    float rope_theta;             /* @40 */
    int32_t rope_style;           /* @44  LKV_ROPE_* */
    float norm_eps;               /* @48  RMSNorm epsilon */
    int32_t tied_classifier;      /* @52  1: logits use tok_embeddings */
    int32_t qkv_bias;             /* @56  1: bq, bk, bv present */
    int32_t weight_dtype;         /* @60  LKV_DTYPE_* of matrices and embedding */
    int32_t bos_id;               /* @64  -1 if none */
    int32_t eos_id;               /* @68  -1 if none */
    int32_t add_bos;              /* @72  1: prepend bos_id to a prompt */
    int32_t chat_template;        /* @76  LKV_CHAT_* */
    int32_t n_stop;               /* @80  number of valid stop_ids */
    int32_t stop_ids[LKV_MAX_STOP]; /* @84 generation stops on any of these */
    int32_t n_tensors;            /* @116 entries in the tensor table */
    int32_t reserved0;            /* @120 zero */
    int32_t reserved1;            /* @124 zero */
    uint64_t tensor_table_offset; /* @128 */
    uint64_t tokenizer_offset;    /* @136 */
    uint64_t tokenizer_bytes;     /* @144 */
    uint64_t file_bytes;          /* @152 total file size */
} LkvHeader;                      /* 160 bytes used, the rest of the 256 is zero */

typedef struct {
    char name[LKV_TENSOR_NAME_MAX]; /* @0  NUL-terminated, e.g. "layers.3.wq" */
    int32_t dtype;                  /* @64 LKV_DTYPE_* */
    int32_t ndim;                   /* @68 1 or 2 */
    int32_t shape[2];               /* @72 unused dims are 1 */
    uint64_t offset;                /* @80 from the start of the file, 64-byte aligned */
    uint64_t nbytes;                /* @88 */
} LkvTensorEntry;                   /* 96 bytes */

/* Tokenizer section, at tokenizer_offset:
 *   int32 kind            LKV_TOK_*
 *   int32 pretokenizer    LKV_PRETOK_*
 *   int32 vocab_size      equals the header's
 *   int32 n_merges        0 for LKV_TOK_SPM
 *   int32 max_token_bytes longest token in bytes
 *   vocab_size records:   int32 type (GGUF token type: 1 normal, 2 unknown, 3 control,
 *                         4 user-defined, 5 unused, 6 byte), float32 score, int32 nbytes,
 *                         then nbytes bytes. For LKV_TOK_BPE the bytes are the token's raw
 *                         bytes (GPT-2's byte-to-unicode mapping already undone); for
 *                         LKV_TOK_SPM they are the piece as in the vocabulary ("\xe2\x96\x81"
 *                         for a space, "<0x0A>" for byte tokens).
 *   n_merges records:     int32 left_id, int32 right_id, int32 result_id; rank = index. */
enum { LKV_TOK_NONE = 0, LKV_TOK_BPE = 1, LKV_TOK_SPM = 2 };
enum { LKV_PRETOK_NONE = 0, LKV_PRETOK_GPT2 = 1, LKV_PRETOK_SMOLLM = 2,
       LKV_PRETOK_LLAMA3 = 3, LKV_PRETOK_QWEN2 = 4 };
enum { LKV_TT_NORMAL = 1, LKV_TT_UNKNOWN = 2, LKV_TT_CONTROL = 3, LKV_TT_USER = 4,
       LKV_TT_UNUSED = 5, LKV_TT_BYTE = 6 };

/* llama2.c's legacy checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size, seq_len; vocab_size < 0 means an untied classifier), then fp32 weights in the
 * order tok_embeddings, all attn_norm, all wq, all wk, all wv, all wo, all ffn_norm, all w1,
 * all w2, all w3, norm, two freq_cis tables of seq_len*head_dim/2 floats (ignored), output.
 * Its tokenizer.bin: int32 max_token_length, then per token: float32 score, int32 len, bytes. */
#define LKV_LEGACY_HEADER_BYTES 28

/* ----------------------------------------------------------------------------------------
 * 2. Tokenizer interface (implemented in tokenizer.c)
 * ---------------------------------------------------------------------------------------- */

typedef struct Tokenizer Tokenizer;

/* Builds from the tokenizer section of model.bin (buf, size). Returns 0, or -1 after writing
 * a one-line reason into err (errlen bytes). */
int build_tokenizer(Tokenizer **t, const uint8_t *buf, size_t size, char *err, size_t errlen);
/* Builds from llama2.c's tokenizer.bin for a vocabulary of vocab_size tokens. */
int build_tokenizer_legacy(Tokenizer **t, const char *path, int vocab_size, char *err,
                           size_t errlen);
/* The same from the file's bytes (buf, size), which the caller keeps. */
int build_tokenizer_legacy_bytes(Tokenizer **t, const uint8_t *buf, size_t size,
                                 int vocab_size, char *err, size_t errlen);
void free_tokenizer(Tokenizer *t);
/* Encodes len bytes of text (any bytes; invalid UTF-8 is handled as documented in
 * tokenizer.c) into at most max_ids ids. Special-token strings become their ids. Returns the
 * number of ids, or -1 when more than max_ids would be needed. Adds no BOS. */
int tokenizer_encode(Tokenizer *t, const char *text, size_t len, int *ids, int max_ids);
/* The raw bytes of one token, for printing (*len set). Control tokens give their text. */
const char *tokenizer_piece(Tokenizer *t, int id, int *len);
/* Looks a token up by its exact bytes; -1 if absent. */
int tokenizer_find(Tokenizer *t, const char *bytes, int len);
int tokenizer_vocab_size(Tokenizer *t);

/* ----------------------------------------------------------------------------------------
 * 3. fp16 <-> fp32, IEEE binary16, round to nearest even. Written out bit by bit so that the
 * host (no _Float16 needed) and the device give the same bits.
 * ---------------------------------------------------------------------------------------- */

LKV_HD float lkv_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);             /* inf, nan */
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (man << 13);   /* normal */
    else if (man == 0) u = sign;                                        /* zero */
    else {                                                              /* subnormal */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

LKV_HD uint16_t lkv_f2h(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* rounds to inf */
    if (a < 0x38800000u) {                                              /* subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;                     /* below half the smallest */
        uint32_t man = (a & 0x7fffffu) | 0x800000u, shift = 126 - (a >> 23);
        uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((a >> 13) - (112u << 10)), rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

/* ----------------------------------------------------------------------------------------
 * 4. Page layout (../shared/LEANKV.md section 5)
 *
 * A page holds tokens of one (sequence, layer, KV head), all at one precision. Inside a page
 * of T tokens at precision (kbits, vbits) with g channel groups per head vector, in order:
 *   K codes    T * head_dim * kbits / 8 bytes   (kbits 16: the fp16 values themselves,
 *                                               kbits 32: the fp32 values, a debug cache)
 *   K scale/zero  T * g * 2 fp16                 (absent when kbits is 16 or 32)
 *   V codes    T * head_dim * vbits / 8
 *   V scale/zero  T * g * 2 fp16                 (absent when vbits is 16 or 32)
 *   scores     T fp32    (attention-mass sums, section 3)      } a tiered cache's pages only
 *   positions  T int32   (the token's position in its sequence) }
 * each segment starting at a multiple of LKV_SEG_ALIGN bytes so that 16-byte loads work.
 * Every page of a run has the same byte size, whatever its precision. Scores and positions
 * are what leankv's policy reads (section 3, 4); a cache of one precision never prunes or
 * demotes, so its pages leave them out (scores = pos = -1) and hold 8 bytes a token less.
 * ---------------------------------------------------------------------------------------- */

#define LKV_SEG_ALIGN 16
#define LKV_MAX_HEAD_DIM 512
#define LKV_MAX_TIERS 2

typedef struct {
    int kbits, vbits;   /* 32, 16, 8, 4 or 2 */
    int groups;         /* channel groups per head vector (scale/zero pairs) */
} LkvPrecision;

typedef struct {
    int tokens;         /* tokens per page at this precision */
    int k_codes, k_sz;  /* byte offsets of the segments inside the page */
    int v_codes, v_sz;
    int scores, pos;    /* -1 in the pages of a one-precision cache: not kept */
    int used;           /* bytes used, the rest of the page is waste */
} LkvPageLayout;

LKV_HD int lkv_align(int x) { return (x + LKV_SEG_ALIGN - 1) / LKV_SEG_ALIGN * LKV_SEG_ALIGN; }

/* Bytes of one token's head vector in a page: its codes, and its scale/zero pairs (fp16
 * each). Section 4b writes exactly these; 16 and 32 bits store plain values and no pairs. */
LKV_HD int lkv_code_bytes(int head_dim, int bits) { return head_dim * bits / 8; }
LKV_HD int lkv_sz_bytes(int groups, int bits) { return bits <= 8 ? groups * 2 * 2 : 0; }

/* segment offsets for T tokens (tiered: with scores and positions); returns the bytes they need */
LKV_HD int lkv_layout(LkvPageLayout *L, LkvPrecision p, int head_dim, int T, int tiered) {
    int off = 0;
    L->tokens = T;
    L->k_codes = off; off = lkv_align(off + T * lkv_code_bytes(head_dim, p.kbits));
    L->k_sz = off;    off = lkv_align(off + T * lkv_sz_bytes(p.groups, p.kbits));
    L->v_codes = off; off = lkv_align(off + T * lkv_code_bytes(head_dim, p.vbits));
    L->v_sz = off;    off = lkv_align(off + T * lkv_sz_bytes(p.groups, p.vbits));
    L->scores = L->pos = -1;
    if (tiered) {
        L->scores = off;  off = lkv_align(off + T * 4);
        L->pos = off;     off = lkv_align(off + T * 4);
    }
    L->used = off;
    return off;
}

/* the most tokens at precision p that fit a page of page_bytes; fills L */
LKV_HD int lkv_layout_fit(LkvPageLayout *L, LkvPrecision p, int head_dim, int page_bytes,
                          int tiered) {
    /* the size grows monotonically with T and is at least T * per_token (alignment only
     * adds), so page_bytes / per_token + 1 is an upper estimate to step down from */
    int per_token = lkv_code_bytes(head_dim, p.kbits) + lkv_sz_bytes(p.groups, p.kbits) +
                    lkv_code_bytes(head_dim, p.vbits) + lkv_sz_bytes(p.groups, p.vbits) +
                    (tiered ? 8 : 0);
    int T = page_bytes / per_token + 1;
    while (T > 0 && lkv_layout(L, p, head_dim, T, tiered) > page_bytes) T--;
    if (T <= 0) { lkv_layout(L, p, head_dim, 0, tiered); return 0; }
    return T;
}

/* The page size rule (ours, after the paper's): among page sizes that are multiples of 64
 * bytes and hold between 16 and 32 tokens at the widest precision in use, take the one whose
 * worst relative waste over all precisions is smallest; ties go to the smaller page. */
#define LKV_PAGE_MIN_TOKENS 16
#define LKV_PAGE_MAX_TOKENS 32
#define LKV_PAGE_STEP 64

/* (the pages of more than one tier keep scores and positions) */
LKV_HD int lkv_page_bytes(const LkvPrecision *tiers, int n_tiers, int head_dim, float *worst_waste) {
    int tiered = n_tiers > 1;
    int widest = 0, widest_bits = -1;
    for (int i = 0; i < n_tiers; i++) {
        int b = tiers[i].kbits + tiers[i].vbits;
        if (b > widest_bits) { widest_bits = b; widest = i; }
    }
    LkvPageLayout L;
    int lo = lkv_layout(&L, tiers[widest], head_dim, LKV_PAGE_MIN_TOKENS, tiered);
    int hi = lkv_layout(&L, tiers[widest], head_dim, LKV_PAGE_MAX_TOKENS, tiered);
    int best = -1;
    float best_waste = 2.0f;
    for (int P = (lo + LKV_PAGE_STEP - 1) / LKV_PAGE_STEP * LKV_PAGE_STEP; P <= hi + LKV_PAGE_STEP;
         P += LKV_PAGE_STEP) {
        float worst = 0.0f;
        for (int i = 0; i < n_tiers; i++) {
            lkv_layout_fit(&L, tiers[i], head_dim, P, tiered);
            float w = (float)(P - L.used) / (float)P;
            if (w > worst) worst = w;
        }
        if (worst < best_waste - 1e-6f) { best_waste = worst; best = P; }
    }
    if (worst_waste) *worst_waste = best_waste;
    return best;
}

/* ----------------------------------------------------------------------------------------
 * 4b. Quantization of a head vector (../shared/LEANKV.md section 2)
 *
 * A head vector of d channels is split into `groups` groups of d/groups channels; each group
 * is quantized asymmetrically to `bits` bits (L = 2^bits - 1 levels above zero):
 *   zero  = fp16(min)                 scale = fp16((max - min) / L)    (fp32, then fp16)
 *   q     = clamp(rint((x - zero) / scale), 0, L)    with the fp16-rounded zero and scale
 *   x'    = fmaf(q, scale, zero)
 * rint is round-half-even; x - zero and / scale are each one IEEE fp32 operation. A group whose
 * range is zero, or whose fp16 scale rounds to 0 (ranges below ~L * 3e-8), stores scale 0 and
 * q = 0: it comes back as zero. A zero of -0 is stored as +0, so that a min/max reduction in
 * any order (where -0 and +0 tie) gives the same bytes.
 *
 * Storage, per token: codes packed low bits first (bits 4: byte j holds element 2j in bits 0-3
 * and 2j+1 in bits 4-7; bits 2: element 4j in bits 0-1 ... 4j+3 in bits 6-7; bits 8: one per
 * byte), then sz[2g] = scale, sz[2g+1] = zero of group g, as fp16 bits. Bits 16 stores the
 * fp16 values as codes (2 bytes each) and bits 32 the fp32 values (an exact debug cache);
 * both leave sz alone. Byte counts are lkv_code_bytes and lkv_sz_bytes (section 4).
 * Requires bits in {2, 4, 8, 16, 32}, d divisible by groups and by 8 / bits, codes aligned
 * to 2 (bits 16) or 4 (bits 32) bytes.
 *
 * Identical codes on host and device. The only rounding steps are the fp32 subtract and
 * divide (the same on both sides when each is one IEEE operation), fp16 rounding (lkv_f2h,
 * integer code), rintf and the fmaf of dequantization (correctly rounded on both sides).
 * Nothing here multiplies and then adds, so FMA contraction (gcc -ffp-contract=fast, nvcc
 * -fmad=true) has nothing to fuse; dequantization calls fmaf itself rather than hoping for a
 * contraction (q * scale has at most 8 + 11 significant bits, so it is exact in fp32 and a
 * kernel's plain q * scale + zero, fused or not, gives the same bits as fmaf). On the device
 * the subtract and divide are __fsub_rn / __fdiv_rn, which --use_fast_math does not turn into
 * approximate division and which are never fused. Flushing subnormals (-ftz)
 * changes no code or value: zero and scale are fp16 (multiples of 2^-24), so x - zero and x'
 * are never fp32-subnormal unless zero is 0 and x is tiny, and then q is 0 either way. On the
 * host a division is IEEE unless -ffast-math (reciprocal multiply) or x87 excess precision is
 * on, which is refused below.
 *
 * Inputs are finite and inside the fp16 range (|x| < 65520), as for the fp16 cache: beyond
 * it zero or scale become infinite. Codes stay in 0..L whatever the input (NaN gives 0).
 *
 * Error (proved in tests/test_quant.c, which checks it element by element): with s, z the
 * stored scale and zero, u = 2^-24 and hulp(y) half an fp32 ulp of y,
 *   |x' - x| <= max(s/2 + (2u + u^2) |x - z|,  z - min,  max - z - L s) + hulp(x')
 * The last two terms are the clamps at 0 and L that the fp16 rounding of zero and scale cause.
 * For a group with min <= 0 <= max and s >= 2^-14 (fp16 normal) they stay below s/2, so
 * |x' - x| <= s/2 + 2^-14 s, with s <= (max - min) / L * (1 + 2^-11 + 2^-21): the ideal
 * min-max error plus the fp16 rounding of the scale. Elsewhere (e.g. values 1000.3..1001)
 * the fp16 rounding of zero can dominate: up to half an fp16 ulp of min.
 * ---------------------------------------------------------------------------------------- */

/* FLT_EVAL_METHOD 16 (newer gcc on CPUs with AVX512-FP16) still evaluates float as float */
#if !defined(__CUDA_ARCH__) && (defined(__FAST_MATH__) || \
    (defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0 && __FLT_EVAL_METHOD__ != 16))
#error "leankv.h 4b: quantization needs IEEE fp32 division (no -ffast-math, no x87 excess precision) so that host and device codes agree"
#endif

LKV_HD int lkv_levels(int bits) { return (1 << bits) - 1; }

/* one IEEE fp32 subtract / divide, rounded to nearest, on either side (see above) */
LKV_HD float lkv_sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

LKV_HD float lkv_div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

/* A group's fp16 scale and zero from its min and max (bits 2, 4 or 8). Kernels that reduce
 * min and max in parallel call this with the result; any reduction order gives the same. */
LKV_HD void lkv_quant_params(float mn, float mx, int bits, uint16_t *scale_h, uint16_t *zero_h) {
    uint16_t z = lkv_f2h(mn), s = lkv_f2h(lkv_div_rn(lkv_sub_rn(mx, mn), (float)lkv_levels(bits)));
    if (z == 0x8000u) z = 0;           /* -0 -> +0 */
    if ((s & 0x7fffu) == 0) s = 0;     /* zero range (or -0 from -0 - +0), or underflow */
    *scale_h = s;
    *zero_h = z;
}

/* the code of one value given its group's scale and zero (as floats, from lkv_h2f) */
LKV_HD int lkv_quant_code(float x, float scale, float zero, int bits) {
    if (!(scale > 0.0f)) return 0;
    float t = rintf(lkv_div_rn(lkv_sub_rn(x, zero), scale));
    if (!(t > 0.0f)) return 0;        /* below the range, or NaN */
    int top = lkv_levels(bits);
    return t >= (float)top ? top : (int)t;
}

/* code j of a packed vector (bits 2, 4 or 8) */
LKV_HD int lkv_code_at(const uint8_t *codes, int bits, int j) {
    int per_byte = 8 / bits;
    return (codes[j / per_byte] >> (j % per_byte * bits)) & lkv_levels(bits);
}

/* x (d) -> codes (lkv_code_bytes(d, bits)) and sz (groups scale/zero pairs) */
LKV_HD void lkv_quantize(const float *x, int d, int bits, int groups, uint8_t *codes,
                         uint16_t *sz) {
    if (bits == 32) { memcpy(codes, x, (size_t)d * sizeof(float)); return; }
    if (bits == 16) {
        uint16_t *h = (uint16_t *)codes;
        for (int j = 0; j < d; j++) h[j] = lkv_f2h(x[j]);
        return;
    }
    int gs = d / groups, filled = 0;   /* filled: bits already in the byte being built */
    uint32_t byte = 0;
    for (int g = 0; g < groups; g++) {
        const float *xg = x + g * gs;
        float mn = xg[0], mx = xg[0];
        for (int j = 1; j < gs; j++) {
            if (xg[j] < mn) mn = xg[j];
            if (xg[j] > mx) mx = xg[j];
        }
        uint16_t sh, zh;
        lkv_quant_params(mn, mx, bits, &sh, &zh);
        sz[2 * g] = sh;
        sz[2 * g + 1] = zh;
        float scale = lkv_h2f(sh), zero = lkv_h2f(zh);
        for (int j = 0; j < gs; j++) {
            byte |= (uint32_t)lkv_quant_code(xg[j], scale, zero, bits) << filled;
            filled += bits;
            if (filled == 8) { *codes++ = (uint8_t)byte; byte = 0; filled = 0; }
        }
    }
}

/* element j of a stored vector, for kernels that dequantize in registers */
LKV_HD float lkv_dequant_at(const uint8_t *codes, const uint16_t *sz, int d, int bits,
                            int groups, int j) {
    if (bits == 32) return ((const float *)codes)[j];
    if (bits == 16) return lkv_h2f(((const uint16_t *)codes)[j]);
    int g = j / (d / groups);
    return fmaf((float)lkv_code_at(codes, bits, j), lkv_h2f(sz[2 * g]), lkv_h2f(sz[2 * g + 1]));
}

/* the whole vector: x (d) = dequantized codes */
LKV_HD void lkv_dequantize(const uint8_t *codes, const uint16_t *sz, int d, int bits, int groups,
                           float *x) {
    if (bits == 32) { memcpy(x, codes, (size_t)d * sizeof(float)); return; }
    if (bits == 16) {
        const uint16_t *h = (const uint16_t *)codes;
        for (int j = 0; j < d; j++) x[j] = lkv_h2f(h[j]);
        return;
    }
    int gs = d / groups;
    for (int g = 0; g < groups; g++) {
        float scale = lkv_h2f(sz[2 * g]), zero = lkv_h2f(sz[2 * g + 1]);
        for (int j = g * gs; j < (g + 1) * gs; j++)
            x[j] = fmaf((float)lkv_code_at(codes, bits, j), scale, zero);
    }
}

/* ----------------------------------------------------------------------------------------
 * 4c. Tiers: significance, placement and the decode policy (../shared/LEANKV.md sections 3-6)
 *
 * A two-tier cache ("--kv leankv") keeps every token of a head in the high tier (tier 0), the
 * low tier (tier 1), or nowhere (pruned). Page table of a head, `width` entries:
 *   high-tier token i:  page table[i / tpp_high],              slot i % tpp_high
 *   low-tier token j:   page table[width - 1 - j / tpp_low],   slot j % tpp_low
 * so high pages fill from the left, low pages from the right, and neither ever moves a token
 * to make room for the other.
 *
 * Significance (section 3). Each cached token carries an fp32 `score` (a sum of attention
 * probabilities) and its position `pos`. Query rows are counted from `first` on: at prefill the
 * last LKV_SCORE_ROWS rows of the prompt, then every decode step. When n queries (positions
 * 0 .. n-1) have run, the counted rows that saw token pos are those in [max(pos, first), n), so
 *   n_q  = n - max(pos, first)        mean = score / n_q
 * Prefill: score = max over the GQA group of (sum over counted rows of that query head's
 * probability). Decode: each step adds max over the group of that step's probability.
 *
 * Thresholds (section 4), n = the current length (prompt length at prefill; at a decode step,
 * the new token's position, i.e. the queries run so far): a token is eligible for compression
 * when pos < n - window (the `window` most recent tokens never are), and then
 *   mean < alpha_low / n  -> pruned,   mean < alpha_high / n -> low tier,   else high.
 * Divisions are single IEEE operations (lkv_div_rn) so host and device classify alike.
 *
 * Prefill placement per head: every eligible token is classified by those two cuts. Sorting the
 * eligible tokens by mean and cutting the sorted list where it crosses alpha_low/n and
 * alpha_high/n (the paper's wording) gives exactly the same three sets, so no sort is needed;
 * each tier keeps its tokens in position order.
 *
 * Decode policy per head, before a step's attention; L = the eligible high-tier token of lowest
 * mean, R = the eligible low-tier token of lowest mean (ties: the lower index), m() the mean,
 * a missing L or R counting as +infinity:
 *   1 PRUNE:  m(L) < alpha_low/n and m(L) < m(R)     L is dropped; the new token takes its slot
 *   2 SWAP:   else m(L) < alpha_high/n and m(R) < alpha_low/n
 *                                                    L is re-quantized into R's low slot (R is
 *                                                    dropped); the new token takes L's slot
 *   3 DEMOTE: else m(L) < alpha_high/n               L is re-quantized into a new low slot; the
 *                                                    new token takes L's slot
 *   4 APPEND: else                                   the new token goes to the end of the high tier
 * New tokens enter the high tier with score 0. Only DEMOTE (low tier full) and APPEND (high
 * tier full) can need a page; a head grows by at most one token a step.
 *
 * Pages (section 6): a prefill reserves lkv_prefill_pages(n) high pages per head. Placement
 * needs at most that many: ceil(a/h) + ceil(b/l) <= ceil((a+b)/h) + 1 for a high and b low
 * tokens, a + b <= n, l >= h. So it never takes a page, only gives back.
 * ---------------------------------------------------------------------------------------- */

#define LKV_SCORE_ROWS 64   /* prompt rows whose attention is counted at prefill (section 3) */

enum { LKV_HIGH = 0, LKV_LOW = 1, LKV_PRUNED = 2 };
enum { LKV_CASE_NONE = 0, LKV_CASE_PRUNE = 1, LKV_CASE_SWAP = 2, LKV_CASE_DEMOTE = 3,
       LKV_CASE_APPEND = 4 };

typedef struct {
    float alpha_high;   /* tokens below alpha_high / n leave the high tier */
    float alpha_low;    /* tokens below alpha_low / n are pruned; 0 <= alpha_low <= alpha_high */
    int window;         /* the most recent tokens, never compressed */
    int first;          /* first counted query row: lkv_score_first(prompt length) */
} LkvPolicy;

/* the first prompt row whose attention counts towards the scores */
LKV_HD int lkv_score_first(int n_prompt) {
    return n_prompt > LKV_SCORE_ROWS ? n_prompt - LKV_SCORE_ROWS : 0;
}

/* counted query rows that have seen token pos once queries 0 .. n-1 have run */
LKV_HD int lkv_queries_seen(int n, int pos, int first) { return n - (pos > first ? pos : first); }

/* mean significance of a token: its score over the counted rows that saw it */
LKV_HD float lkv_mean(float score, int n, int pos, int first) {
    int nq = lkv_queries_seen(n, pos, first);
    return nq > 0 ? lkv_div_rn(score, (float)nq) : INFINITY;
}

LKV_HD int lkv_eligible(int pos, int n, int window) { return pos < n - window; }

/* alpha / n: the cut for a mean at length n */
LKV_HD float lkv_cut(float alpha, int n) { return lkv_div_rn(alpha, (float)n); }

/* the tier an eligible token of mean m belongs to at length n (prefill placement) */
LKV_HD int lkv_classify(float m, int n, float alpha_high, float alpha_low) {
    if (m < lkv_cut(alpha_low, n)) return LKV_PRUNED;
    if (m < lkv_cut(alpha_high, n)) return LKV_LOW;
    return LKV_HIGH;
}

/* the decode case of a head (see above); mL / mR = INFINITY when there is no L / R */
LKV_HD int lkv_decode_case(float mL, float mR, int n, float alpha_high, float alpha_low) {
    float lo = lkv_cut(alpha_low, n), hi = lkv_cut(alpha_high, n);
    if (mL < lo && mL < mR) return LKV_CASE_PRUNE;
    if (mL < hi && mR < lo) return LKV_CASE_SWAP;
    if (mL < hi) return LKV_CASE_DEMOTE;
    return LKV_CASE_APPEND;
}

/* pages for n tokens at tpp tokens a page */
LKV_HD int lkv_pages_for(int n, int tpp) { return (n + tpp - 1) / tpp; }

/* high pages a head reserves for a prompt of n tokens: the tokens, plus one for placement */
LKV_HD int lkv_prefill_pages(int n, int tpp_high) { return lkv_pages_for(n, tpp_high) + 1; }

/* table index of low-tier token j */
LKV_HD int lkv_low_index(int width, int j, int tpp_low) { return width - 1 - j / tpp_low; }

/* pages (high, low) that a decode case takes, given each tier's tokens and pages */
LKV_HD int lkv_case_pages(int c, int tier, int n_tok, int n_pg, int tpp) {
    int full = n_tok >= n_pg * tpp;
    if (c == LKV_CASE_APPEND && tier == LKV_HIGH) return full;
    if (c == LKV_CASE_DEMOTE && tier == LKV_LOW) return full;
    return 0;
}

/* Compression of a set of heads against a plain fp16 cache of every token they processed
 * (section 4): bits-only = 32 / sum_tier f_tier (kbits + vbits), f_tier the fraction of the
 * processed tokens held in that tier (pruned ones hold nothing); physical = fp16 bytes of K
 * and V of every processed token over the bytes of the pages held. */
LKV_HD double lkv_ratio_bits(double seen, double n_high, int bits_high, double n_low,
                             int bits_low) {
    double bits = n_high * bits_high + n_low * bits_low;
    return bits > 0 ? 32.0 * seen / bits : 0.0;
}

LKV_HD double lkv_ratio_physical(double seen, int head_dim, double pages, int page_bytes) {
    return pages > 0 ? seen * head_dim * 4.0 / (pages * page_bytes) : 0.0;
}

/* ----------------------------------------------------------------------------------------
 * 4d. Swap space: a preempted sequence parked in host memory (--swap-mem)
 *
 * When a decode step lacks pages the scheduler preempts the newest request. Without swap space
 * its pages are freed and it is computed again from its prompt when pages allow (recompute). With
 * swap space its pages are first copied into a pool of host pages of the same size, in the order
 * of its heads' tables (head 0's high pages, then its low pages, then head 1's ...), together
 * with what each head held; when it is admitted again it takes as many pages per head and tier
 * as it had, the bytes come back, and it resumes where it stopped. Its tokens, tiers and scores
 * are those it had, so it generates what it would have without the preemption: on a two-tier
 * cache a recomputed prompt is placed afresh and may not. Page ids change; nothing reads them
 * but the tables. The host pages are a stack of free ids: a sequence takes its n pages in one go
 * (or none, and is recomputed instead) and gives them back when it returns.
 * ---------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *pages;     /* (n_pages, the pool's page size) host memory; pinned, mapped on the GPU */
    int *free_ids;      /* (n_pages) free page ids in [0, n_free) */
    int n_free;         /* free pages */
    int n_pages;        /* pages in the swap space; 0: none (preemption recomputes) */
} LkvSwapSpace;

typedef struct {
    int n_pages;        /* swap-space pages it holds; 0: not parked */
    int *pages;         /* (n_pages) their ids, in table order: per head, high pages then low */
    int *n_tok;         /* (heads, LKV_MAX_TIERS) tokens each head held in each tier */
    int *n_pg;          /* (heads, LKV_MAX_TIERS) pages each head held in each tier */
    int len;            /* tokens the sequence had processed */
    LkvPolicy policy;   /* its alphas, window and first counted row (two tiers) */
} LkvSwapped;

/* pages of page_bytes that mib MiB hold (at most INT_MAX / 2) */
static inline int lkv_swap_count(size_t mib, int page_bytes) {
    size_t n = (mib << 20) / page_bytes;
    return n > INT_MAX / 2 ? INT_MAX / 2 : (int)n;
}

/* an empty swap space of n pages at `pages` (the caller's memory, n of the pool's pages), every
 * id free; -1 when its list of free ids cannot be allocated */
static inline int lkv_swap_init(LkvSwapSpace *sp, uint8_t *pages, int n) {
    sp->free_ids = (int *)malloc((size_t)n * sizeof(int));
    if (!sp->free_ids) return -1;
    sp->pages = pages;
    sp->n_pages = sp->n_free = n;
    for (int i = 0; i < n; i++) sp->free_ids[i] = n - 1 - i;
    return 0;
}

/* takes n pages of the swap space for s (its pages[] allocated here); -1 and nothing taken
 * when fewer are free */
static inline int lkv_swap_take(LkvSwapSpace *sp, int n, LkvSwapped *s) {
    if (n > sp->n_free || n < 1) return -1;
    s->pages = (int *)malloc((size_t)n * sizeof(int));
    if (!s->pages) return -1;
    s->n_pages = n;
    for (int i = 0; i < n; i++) s->pages[i] = sp->free_ids[--sp->n_free];
    return 0;
}

/* gives s's pages back to the swap space and forgets what it held */
static inline void lkv_swap_give(LkvSwapSpace *sp, LkvSwapped *s) {
    for (int i = 0; i < s->n_pages; i++) sp->free_ids[sp->n_free++] = s->pages[i];
    free(s->pages); free(s->n_tok); free(s->n_pg);
    memset(s, 0, sizeof *s);
}

/* ----------------------------------------------------------------------------------------
 * 5. The model in memory, as the CPU side loads it and the GPU side uploads it
 * ---------------------------------------------------------------------------------------- */

typedef struct {
    int dim;          /* model width */
    int hidden_dim;   /* FFN width */
    int n_layers;
    int n_heads;      /* query heads */
    int n_kv_heads;   /* key/value heads; n_heads / n_kv_heads queries share one */
    int head_dim;
    int vocab_size;
    int seq_len;      /* the model's trained context */
    float rope_theta;
    int rope_style;   /* LKV_ROPE_* */
    float norm_eps;
    int tied;         /* classifier = token embedding */
    int qkv_bias;
    int bos_id, eos_id, add_bos, chat_template;
    int n_stop, stop_ids[LKV_MAX_STOP];
} Config;

typedef struct {
    float *attn_norm;  /* (dim) */
    float *wq;         /* (n_heads*head_dim, dim) */
    float *wk;         /* (n_kv_heads*head_dim, dim) */
    float *wv;         /* (n_kv_heads*head_dim, dim) */
    float *bq, *bk, *bv; /* (rows of wq, wk, wv) or NULL */
    float *wo;         /* (dim, n_heads*head_dim) */
    float *ffn_norm;   /* (dim) */
    float *w1;         /* (hidden_dim, dim) gate */
    float *w2;         /* (dim, hidden_dim) down */
    float *w3;         /* (hidden_dim, dim) up */
} LayerWeights;

typedef struct {
    float *tok_embeddings; /* (vocab, dim) */
    LayerWeights *layers;  /* (n_layers) */
    float *norm;           /* (dim) */
    float *output;         /* (vocab, dim), = tok_embeddings when tied */
} Weights;


/* ----------------------------------------------------------------------------------------
 * 6. GPU engine interface (leankv.cu)
 *
 * The engine keeps the weights (fp16) and a paged KV cache on the GPU and runs batches of
 * "rows": a row is one token of one sequence at that sequence's next position. A sequence
 * lives in a slot (0 .. max_slots-1); the engine remembers how many tokens each slot holds, so
 * callers pass tokens, never positions. Pages are those of section 4 at the cache's precision
 * (fp16, or kXvY codes written by section 4b on the device; the same lkv_page_bytes rule as
 * the CPU cache, so the same bytes); each (slot, layer, KV head) has its own page table,
 * and the free page ids sit in a circular array, all in GPU memory (../shared/LEANKV.md 5-6).
 *
 * A caller that schedules many requests (continuous batching) asks gpu_pages_needed before a
 * step, and frees a slot with gpu_release when a request ends or is preempted.
 *
 * Built when LKV_CUDA is defined (make with nvcc). Without it the same names exist as stubs
 * that report "built without CUDA", so a CPU-only build compiles and links unchanged.
 * ---------------------------------------------------------------------------------------- */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct GpuEngine GpuEngine;

typedef struct {
    int n_pages;          /* pages in the GPU pool */
    int free_pages;       /* of which free now */
    int page_bytes;       /* bytes per page */
    int tokens_per_page;  /* fp16 tokens per page */
    int max_slots;        /* sequences that can be held at once */
    int max_rows;         /* rows one forward pass can take (prefill chunk, decode batch) */
    int ctx;              /* tokens a slot can hold */
    int table_width;      /* page-table entries per (slot, layer, KV head) */
} GpuInfo;

/* NULL when the GPU engine serves caches of precision p at this head dim, else why not: it
 * stores fp16 or codes (fp32 is the CPU's exact debug cache), keys at least as precisely as
 * values (LeanKV's premise; it halves the kernels to build), and channel groups no smaller
 * than what one attention thread loads (8 channels, 16 when keys are codes), so that they
 * share one scale and zero. */
static inline const char *lkv_gpu_refuses(LkvPrecision p, int head_dim) {
    if (p.kbits == 32 || p.vbits == 32) return "--kv fp32 is the CPU's exact debug cache";
    if (p.vbits > p.kbits) return "the GPU engine stores keys at least as precisely as values";
    if (p.groups < 1 || head_dim % p.groups || (head_dim / p.groups) % (p.kbits == 16 ? 8 : 16))
        return "the GPU engine needs channel groups of a multiple of 16 channels (8 with fp16 keys)";
    return NULL;
}

#ifdef LKV_CUDA
/* 1 when a CUDA device is usable, with its name in name[len]; else 0 and the reason */
int gpu_available(char *name, size_t len);
/* Uploads the weights as fp16 and allocates everything once: a pool of kv_mem_mib MiB of pages
 * (0: most of the free GPU memory) for a cache of n_tiers precisions (1; or 2, leankv's high and
 * low tiers with the default alphas and window of `policy`), page tables for max_slots
 * sequences of ctx tokens, and activations for max(max_slots, prefill_chunk) rows. Prints the
 * pool size on stderr. Returns NULL with a one-line reason in err when the model or device
 * cannot be served. w = NULL builds the cache-only test engine (see gpu_test_set_qkv). */
GpuEngine *gpu_build(const Config *c, const Weights *w, const LkvPrecision *tiers, int n_tiers,
                     LkvPolicy policy, int max_slots, int prefill_chunk, int ctx,
                     size_t kv_mem_mib, char *err, size_t errlen);
void gpu_free(GpuEngine *g);
/* Appends tokens[0..n) to slot (chunks of prefill_chunk rows). *next gets the greedy token
 * after the last one; logits, if not NULL, gets (n, vocab) fp32, one row per token.
 * Returns 0; -1 when the pool lacks the pages (nothing done); -2 past the context; -3 on a
 * two-tier slot already placed. A two-tier prompt: gpu_begin, gpu_prefill (once or more),
 * gpu_place; then each decode step: gpu_plan, gpu_decode. */
int gpu_prefill(GpuEngine *g, int slot, const int *tokens, int n, int *next, float *logits);
/* two tiers: slot starts a prompt of n_prompt tokens with these alphas (the CPU's kv_begin) */
void gpu_begin(GpuEngine *g, int slot, int n_prompt, float alpha_high, float alpha_low);
/* two tiers: prefill placement of slot's prompt, spare pages given back (kv_place) */
void gpu_place(GpuEngine *g, int slot);
/* the next decode step of n slots: need[i] = pages slot i takes (two tiers: every head's case
 * is decided on the GPU now, kv_plan_step; need is the step's one read-back) */
void gpu_plan(GpuEngine *g, int n, const int *slots, int *need);
/* what a two-tier slot holds, per (layer, KV head): tokens high, low, pages high, low */
void gpu_tier_counts(GpuEngine *g, int slot, int *counts);
/* One decode step for n distinct slots, each taking one token: next[i] gets slot i's greedy
 * token, logits (n, vocab) if not NULL. The step is a CUDA graph per power-of-two batch size.
 * Returns 0, -1 (pool lacks the pages, nothing done), -2 (a slot is at the context) or -3 (a
 * two-tier slot was not planned by gpu_plan). */
int gpu_decode(GpuEngine *g, int n, const int *slots, const int *tokens, int *next,
               float *logits);
/* gives back every page of slot at once; the slot is empty afterwards */
void gpu_release(GpuEngine *g, int slot);
/* Swap space (section 4d): mib MiB of pinned host pages (0: none). 0, or -1 with the reason. */
int gpu_build_swap(GpuEngine *g, size_t mib, char *err, size_t errlen);
/* copies slot's pages and counts into the swap space (s); the caller then releases the slot.
 * -1 and nothing copied when the swap space lacks the room */
int gpu_swap_out(GpuEngine *g, int slot, LkvSwapped *s);
/* brings s back into the empty slot and gives its swap pages back; -1 when the pool lacks them */
int gpu_swap_in(GpuEngine *g, int slot, LkvSwapped *s);
/* pages that appending n_new tokens to slot would take from the pool (two tiers: a prompt) */
int gpu_pages_needed(const GpuEngine *g, int slot, int n_new);
int gpu_slot_len(const GpuEngine *g, int slot);
void gpu_info(const GpuEngine *g, GpuInfo *info);
/* device-to-device copy bandwidth in GB/s (bytes read plus written), for the bench */
double gpu_copy_bandwidth(void);
/* For the tests: the device's write path stores n_tok tokens of k, v (n_tok, head_dim) into
 * pages laid out for precision p, page i holding tokens i*tpp .. (path 0: a prompt's,
 * kv_append; path 1: a decode step's new token, kv_append_image, one group only); and its
 * attention kernel, for gq query heads q (gq, head_dim), over such pages, in splits of
 * pages_per_split pages, into o (gq, head_dim); or, n_rows >= 1, the prompt kernel for n_rows
 * rows at the last positions, each asking q, into o (n_rows, gq, head_dim), row r seeing
 * tokens 0 .. n_tok - n_rows + r. 0, or -1 when the GPU or shape is not served. */
int gpu_test_store(LkvPrecision p, int head_dim, int n_tok, const float *k, const float *v,
                   uint8_t *pages, int path);
int gpu_test_attention(LkvPrecision p, int head_dim, int gq, int n_tok, const uint8_t *pages,
                       const float *q, int pages_per_split, int n_rows, float *o);
/* For bench/: median ms of one decode attention launch over batch synthetic sequences of ctx
 * tokens (CUDA events, after warm-up); *bytes = the K/V bytes it reads. -1 when not served. */
double gpu_bench_attention(LkvPrecision p, int head_dim, int n_heads, int n_kv_heads, int batch,
                           int ctx, int iters, double *bytes);
/* The cache-only test engine: the next rows' q, k, v per layer (n_layers, n_rows, QD+2*KVD),
 * unrotated; the attention output they gave (n_layers, n_rows, QD); a slot's page tables
 * (n_layers * n_kv_heads, table_width) and, pool not NULL, the whole pool's bytes. */
void gpu_test_set_qkv(GpuEngine *g, const float *qkv, int n_rows);
void gpu_test_get_o(GpuEngine *g, float *o, int n_rows);
void gpu_test_cache(GpuEngine *g, int slot, int *tables, uint8_t *pool);
#else
/* CPU-only build: the GPU is never available */
static inline int gpu_available(char *name, size_t len) {
    if (len) { strncpy(name, "built without CUDA", len - 1); name[len - 1] = 0; }
    return 0;
}
static inline GpuEngine *gpu_build(const Config *c, const Weights *w, const LkvPrecision *tiers,
                                   int n_tiers, LkvPolicy policy, int max_slots,
                                   int prefill_chunk, int ctx, size_t kv_mem_mib, char *err,
                                   size_t errlen) {
    (void)c; (void)w; (void)tiers; (void)n_tiers; (void)policy; (void)max_slots;
    (void)prefill_chunk; (void)ctx; (void)kv_mem_mib;
    if (errlen) { strncpy(err, "this leankv was built without CUDA", errlen - 1); err[errlen - 1] = 0; }
    return NULL;
}
static inline void gpu_free(GpuEngine *g) { (void)g; }
static inline int gpu_build_swap(GpuEngine *g, size_t mib, char *err, size_t errlen) {
    (void)g; (void)mib; (void)err; (void)errlen;
    return 0;
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* LEANKV_H */
