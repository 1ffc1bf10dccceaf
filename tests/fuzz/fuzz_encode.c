/* fuzz_encode.c: tokenizer_encode on arbitrary bytes and tokenizer_piece (decode) on arbitrary
 * ids, with fixed tokenizers: the tiny byte-level BPE of tests/fuzz/data/tiny_bpe.tok under
 * each of the five pre-tokenizers, the tiny SentencePiece tests/fuzz/data/tiny_spm.tok, and
 * SmolLM2's (from models/smollm2-135m-instruct.bin) when that file is there. LKV_FUZZ_DATA
 * and LKV_FUZZ_MODEL name other places.
 * Input: byte 0 picks the tokenizer (modulo their number); byte 1 even: encode the rest as text
 * with room for byte 2 ids; odd: decode the rest as little-endian uint16 ids.
 * Properties: encode returns -1 or a count within the room, of ids in the vocabulary, the same
 * ids as with all the room it needs; when every byte has a token, decoding the ids gives back
 * the text after UTF-8 clean-up (plus SentencePiece's leading space); decode gives a piece for
 * every id of the vocabulary and nothing for any other. */
#include "../../tokenizer.c"

#include <assert.h>

#define MAX_TOK 8
static Tokenizer *toks[MAX_TOK];
static int n_toks;
static volatile int sink;

static uint8_t *slurp(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static void add(const uint8_t *buf, size_t size, const char *what) {
    char err[256];
    if (build_tokenizer(&toks[n_toks], buf, size, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_encode: %s: %s\n", what, err);
        abort();
    }
    n_toks++;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    const char *dir = getenv("LKV_FUZZ_DATA") ? getenv("LKV_FUZZ_DATA") : "tests/fuzz/data";
    char path[4096];
    size_t size;
    snprintf(path, sizeof path, "%s/tiny_bpe.tok", dir);
    uint8_t *bpe = slurp(path, &size);
    if (!bpe) { fprintf(stderr, "fuzz_encode: cannot read %s\n", path); abort(); }
    for (int32_t pre = LKV_PRETOK_NONE; pre <= LKV_PRETOK_QWEN2; pre++) {
        memcpy(bpe + 4, &pre, 4);   /* the section's pre-tokenizer field */
        add(bpe, size, path);
    }
    free(bpe);
    snprintf(path, sizeof path, "%s/tiny_spm.tok", dir);
    uint8_t *spm = slurp(path, &size);
    if (!spm) { fprintf(stderr, "fuzz_encode: cannot read %s\n", path); abort(); }
    add(spm, size, path);
    free(spm);
    /* SmolLM2's section, read through the model.bin header */
    const char *model = getenv("LKV_FUZZ_MODEL") ? getenv("LKV_FUZZ_MODEL")
                                                 : "models/smollm2-135m-instruct.bin";
    FILE *f = fopen(model, "rb");
    LkvHeader h;
    if (f && fread(&h, sizeof h, 1, f) == 1 && h.magic == LKV_MAGIC && h.tokenizer_bytes &&
        h.tokenizer_bytes < (1u << 30) && fseek(f, (long)h.tokenizer_offset, SEEK_SET) == 0) {
        uint8_t *sec = malloc(h.tokenizer_bytes);
        if (fread(sec, 1, h.tokenizer_bytes, f) == h.tokenizer_bytes) add(sec, h.tokenizer_bytes, model);
        free(sec);
    }
    if (f) fclose(f);
    return 0;
}

static int all_bytes_have_tokens(const Tokenizer *t) {
    for (int b = 0; b < 256; b++) if (t->byte_id[b] < 0) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!n_toks) LLVMFuzzerInitialize(NULL, NULL);
    if (size < 3) return 0;
    Tokenizer *t = toks[data[0] % n_toks];
    int V = tokenizer_vocab_size(t);
    const uint8_t *p = data + 3;
    size_t n = size - 3;
    if (data[1] % 2 == 1) {   /* decode */
        for (size_t i = 0; i + 1 < n; i += 2) {
            int id = p[i] | p[i + 1] << 8, len;
            const char *s = tokenizer_piece(t, id, &len);
            if (id >= V) { assert(s == NULL && len == 0); continue; }
            assert(s != NULL && len >= 0);
            for (int j = 0; j < len; j++) sink += s[j];
        }
        return 0;
    }
    int room = data[2];
    int *small = malloc(((size_t)room + 1) * sizeof(int));
    int k = tokenizer_encode(t, (const char *)p, n, small, room);
    size_t big_room = 3 * n + 2;
    int *ids = malloc(big_room * sizeof(int));
    int m = tokenizer_encode(t, (const char *)p, n, ids, (int)big_room);
    assert(m >= 0);
    assert(k == -1 ? m > room : (k == m && !memcmp(small, ids, (size_t)k * sizeof(int))));
    for (int i = 0; i < m; i++) assert(ids[i] >= 0 && ids[i] < V);
    if (all_bytes_have_tokens(t)) {
        int spm = t->kind == LKV_TOK_SPM;
        size_t wn = 0, gn = 0, total = 0;
        for (int i = 0; i < m; i++) {
            int len;
            tokenizer_piece(t, ids[i], &len);
            total += (size_t)len;
        }
        uint8_t *want = malloc(3 * n + 2), *got = malloc(total + 1);
        if (spm && n) want[wn++] = ' ';
        wn += utf8_clean(p, n, want + wn, spm);
        for (int i = 0; i < m; i++) {
            int len;
            const char *s = tokenizer_piece(t, ids[i], &len);
            memcpy(got + gn, s, (size_t)len);
            gn += (size_t)len;
        }
        assert(gn == wn && !memcmp(got, want, wn));
        free(want);
        free(got);
    }
    free(small);
    free(ids);
    return 0;
}
