/* fuzz_model.c: the model.bin reader (leankv.c load_leankv_file: header, tensor table, chat
 * system text, tokenizer section) on arbitrary bytes. Input: a model.bin file.
 * Properties: it loads or dies with one line; nothing leaks either way; a loaded model's every
 * weight lies inside the input; a loaded tokenizer encodes and decodes. */
#include "fuzz_leankv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Model m;
    memset(&m, 0, sizeof m);
    uint8_t *copy = malloc(size ? size : 1);   /* exactly size bytes: ASan sees any overread */
    memcpy(copy, data, size);
    m.map = copy;
    m.map_bytes = size;
    if (TRY(load_leankv_file(&m, "fuzz.bin"))) {
        touch_weights(&m);
        if (m.tok) {
            assert(tokenizer_vocab_size(m.tok) == m.c.vocab_size);
            exercise_tokenizer(m.tok);
        }
    } else {
        check_die_message();
    }
    m.map = NULL;   /* free_model then leaves the bytes alone */
    free_model(&m);
    free(copy);
    return 0;
}
