/* fuzz_tokfile.c: the two tokenizer file readers of tokenizer.c on arbitrary bytes.
 * Input: byte 0 even: the rest is a model.bin tokenizer section (build_tokenizer); odd: bytes
 * 1-2 (little-endian) are the vocabulary size and the rest is a llama2.c tokenizer.bin
 * (build_tokenizer_legacy_bytes).
 * Properties: it builds, or fails with a one-line reason and no tokenizer; nothing leaks; a
 * built tokenizer encodes text into ids of its vocabulary, decodes every id, and (byte-level
 * BPE) finds every non-empty token again by its bytes. */
#include "../../tokenizer.c"

#include <assert.h>

static volatile int sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    Tokenizer *t = (Tokenizer *)1;   /* must be set to NULL or a tokenizer */
    char err[256] = "";
    int rc;
    if (data[0] % 2 == 0) {
        rc = build_tokenizer(&t, data + 1, size - 1, err, sizeof err);
    } else {
        if (size < 3) return 0;
        int vocab = data[1] | data[2] << 8;
        rc = build_tokenizer_legacy_bytes(&t, data + 3, size - 3, vocab, err, sizeof err);
    }
    if (rc != 0) {
        assert(rc == -1 && t == NULL);
        assert(err[0] && !strchr(err, '\n'));
        return 0;
    }
    assert(t != NULL && t != (Tokenizer *)1);
    int V = tokenizer_vocab_size(t);
    static const char *texts[] = {"Hello world 2026", "<|im_start|>user\nhi<|im_end|>\n",
                                  "caf\xc3 \xff \xe2\x96\x81 <s> </s> <unk> \t\n  x", ""};
    for (size_t k = 0; k < sizeof texts / sizeof *texts; k++) {
        size_t len = strlen(texts[k]);
        int ids[256];
        int n = tokenizer_encode(t, texts[k], len, ids, 256);
        assert(n >= 0 && n <= 3 * (int)len + 1);
        for (int i = 0; i < n; i++) assert(ids[i] >= 0 && ids[i] < V);
    }
    for (int id = -1; id <= V; id++) {
        int len;
        const char *p = tokenizer_piece(t, id, &len);
        if (id < 0 || id == V) { assert(p == NULL && len == 0); continue; }
        assert(p != NULL && len >= 0);
        for (int j = 0; j < len; j++) sink += p[j];
        if (t->kind == LKV_TOK_BPE && len > 0) {
            int found = tokenizer_find(t, p, len);
            assert(found >= 0 && t->len[found] == len && !memcmp(t->pool + t->off[found], p, (size_t)len));
        }
    }
    free_tokenizer(t);
    return 0;
}
