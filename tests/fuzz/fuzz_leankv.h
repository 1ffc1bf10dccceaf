/* fuzz_leankv.h: what the fuzz targets that call leankv.c's readers share. They include the
 * program the llama2.c way (TESTING leaves out main) with LKV_FUZZ, under which die() jumps
 * back to the target instead of exiting (see leankv.c, section "Errors").
 *
 * TRY(...) runs a statement with die_jump armed; it evaluates to 1 when the statement
 * finished and 0 when it died (the message is in die_message). */
#ifndef FUZZ_LEANKV_H
#define FUZZ_LEANKV_H
#define TESTING
#define LKV_FUZZ
#include "../../leankv.c"

#include <assert.h>

#define TRY(stmt)                                                                   \
    ({ jmp_buf jb_; int ok_ = 0; die_message[0] = 0; die_jump = &jb_;               \
       if (setjmp(jb_) == 0) { stmt; ok_ = 1; }                                      \
       die_jump = NULL; ok_; })

/* a died reader must still have said why, on one line */
static void check_die_message(void) {
    assert(die_message[0] != 0);
    assert(strchr(die_message, '\n') == NULL);
}

static volatile float fuzz_sink;   /* keeps the reads below from being optimized away */

static void touch(const float *p, size_t n) {
    float s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    fuzz_sink += s;
}

/* Every weight pointer a loader hands out must cover the whole tensor the header implies, inside
 * the input: read them all (AddressSanitizer reports a read past the input's bytes). */
static void touch_weights(const Model *m) {
    const Config *c = &m->c;
    const Weights *w = &m->w;
    size_t D = c->dim, H = c->hidden_dim, QD = (size_t)c->n_heads * c->head_dim,
           KVD = (size_t)c->n_kv_heads * c->head_dim, V = c->vocab_size;
    touch(w->tok_embeddings, V * D);
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *L = &w->layers[l];
        touch(L->attn_norm, D); touch(L->ffn_norm, D);
        touch(L->wq, QD * D); touch(L->wk, KVD * D); touch(L->wv, KVD * D); touch(L->wo, D * QD);
        touch(L->w1, H * D); touch(L->w2, D * H); touch(L->w3, H * D);
        if (c->qkv_bias) { touch(L->bq, QD); touch(L->bk, KVD); touch(L->bv, KVD); }
    }
    touch(w->norm, D);
    touch(w->output, V * D);
    for (int i = 0; i < m->system_len; i++) fuzz_sink += m->system[i];
    assert(c->n_stop >= 0 && c->n_stop <= LKV_MAX_STOP);
    for (int i = 0; i < c->n_stop; i++) assert(c->stop_ids[i] >= 0 && c->stop_ids[i] < c->vocab_size);
}

/* a loaded tokenizer must encode and decode without trouble, within the vocabulary */
static void exercise_tokenizer(Tokenizer *t) {
    static const char *texts[] = {"Hello world 2026", "<|im_start|>user\nhi<|im_end|>\n",
                                  "caf\xc3 \xff \xe2\x96\x81 <s> </s> <unk> \t\n  x"};
    int V = tokenizer_vocab_size(t);
    for (size_t k = 0; k < sizeof texts / sizeof *texts; k++) {
        int ids[256];
        int n = tokenizer_encode(t, texts[k], strlen(texts[k]), ids, 256);
        assert(n >= 0);
        for (int i = 0; i < n; i++) {
            assert(ids[i] >= 0 && ids[i] < V);
            int len;
            const char *p = tokenizer_piece(t, ids[i], &len);
            assert(p != NULL && len >= 0);
            for (int j = 0; j < len; j++) fuzz_sink += p[j];
        }
    }
}
#endif
