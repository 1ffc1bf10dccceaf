/* replay.c: a main() for the fuzz targets without libFuzzer, so that gcc's AddressSanitizer +
 * UndefinedBehaviorSanitizer build can replay inputs in the normal test suite:
 *
 *   gcc -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -o replay_model \
 *       tests/fuzz/fuzz_model.c tests/fuzz/replay.c tokenizer.c -lm
 *   ./replay_model tests/fuzz/seeds/model tests/fuzz/regress/model
 *
 * Each argument is a file or a folder of files; every file is fed once to
 * LLVMFuzzerTestOneInput. Prints "replayed N inputs" last; a failed property aborts. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "replay: cannot open %s\n", path); exit(1); }
    uint8_t *buf = NULL;
    size_t size = 0, cap = 0, got;
    do {
        if (size == cap) { cap = cap ? 2 * cap : 4096; buf = realloc(buf, cap); }
        got = fread(buf + size, 1, cap - size, f);
        size += got;
    } while (got > 0);
    fclose(f);
    uint8_t *exact = malloc(size ? size : 1);   /* exactly size bytes, as libFuzzer gives */
    memcpy(exact, buf, size);
    free(buf);
    fprintf(stderr, "replay: %s (%zu bytes)\n", path, size);
    LLVMFuzzerTestOneInput(exact, size);
    free(exact);
    return 1;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    int n = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) { fprintf(stderr, "replay: no such file %s\n", argv[i]); return 1; }
        if (!S_ISDIR(st.st_mode)) { n += replay_file(argv[i]); continue; }
        DIR *d = opendir(argv[i]);
        char **names = NULL;
        size_t k = 0;
        for (struct dirent *e; (e = readdir(d));) {
            if (e->d_name[0] == '.') continue;
            names = realloc(names, (k + 1) * sizeof *names);
            names[k] = malloc(strlen(argv[i]) + strlen(e->d_name) + 2);
            sprintf(names[k++], "%s/%s", argv[i], e->d_name);
        }
        closedir(d);
        qsort(names, k, sizeof *names, cmp_str);
        for (size_t j = 0; j < k; j++) { n += replay_file(names[j]); free(names[j]); }
        free(names);
    }
    printf("replayed %d inputs\n", n);
    return 0;
}
