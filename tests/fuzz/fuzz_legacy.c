/* fuzz_legacy.c: the llama2.c checkpoint reader (leankv.c load_legacy_file) on arbitrary bytes.
 * Input: a checkpoint file. Its tokenizer.bin is a fixed one of 512 tokens that the target
 * writes into a memory file at start-up (the reader takes a path), so that a checkpoint whose
 * vocabulary is at most 512 loads completely.
 * Properties: as fuzz_model.c. */
#define _GNU_SOURCE
#include "fuzz_leankv.h"
#include <sys/mman.h>

static char tok_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    int fd = memfd_create("tokenizer.bin", 0);
    assert(fd >= 0);
    FILE *f = fdopen(dup(fd), "wb");
    int32_t max_len = 8;
    fwrite(&max_len, 4, 1, f);
    for (int i = 0; i < 512; i++) {
        char piece[16];
        if (i == 0) strcpy(piece, "<unk>");
        else if (i == 1) strcpy(piece, "\n<s>\n");
        else if (i == 2) strcpy(piece, "\n</s>\n");
        else if (i < 259) snprintf(piece, sizeof piece, "<0x%02X>", i - 3);
        else snprintf(piece, sizeof piece, " %c%c", 'a' + (i - 259) % 26, 'a' + (i - 259) / 26);
        float score = i < 259 ? 0.0f : -(float)i;
        int32_t len = (int32_t)strlen(piece);
        fwrite(&score, 4, 1, f);
        fwrite(&len, 4, 1, f);
        fwrite(piece, 1, (size_t)len, f);
    }
    fclose(f);
    snprintf(tok_path, sizeof tok_path, "/proc/self/fd/%d", fd);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tok_path[0]) LLVMFuzzerInitialize(NULL, NULL);
    Model m;
    memset(&m, 0, sizeof m);
    uint8_t *copy = malloc(size ? size : 1);
    memcpy(copy, data, size);
    m.map = copy;
    m.map_bytes = size;
    if (TRY(load_legacy_file(&m, "fuzz.bin", tok_path))) {
        touch_weights(&m);
        exercise_tokenizer(m.tok);
    } else {
        check_die_message();
    }
    m.map = NULL;
    free_model(&m);
    free(copy);
    return 0;
}
