/* fuzz_model.c: the model.bin reader (leankv.c load_leankv_file: header, tensor table, chat
 * system text, tokenizer section) on arbitrary bytes. Input: a model.bin file.
 * (byte 255 odd: the header's file size is first set to the input's, see below)
 * Properties: it loads or dies with one line; nothing leaks either way; a loaded model's every
 * weight lies inside the input; a loaded tokenizer encodes and decodes. */
#include "fuzz_leankv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Model m;
    memset(&m, 0, sizeof m);
    uint8_t *copy = malloc(size ? size : 1);   /* exactly size bytes: ASan sees any overread */
    memcpy(copy, data, size);
    /* Byte 255 (header padding) odd: the header's file size is set to the input's, so that a
     * mutation that changes the length still gets past that check to the table and tensors;
     * even: the input as it is. */
    if (size >= LKV_HEADER_BYTES && (copy[255] & 1)) {
        uint64_t n = size;
        memcpy(copy + offsetof(LkvHeader, file_bytes), &n, sizeof n);
    }
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
