/* tok_driver.c: runs tokenizer.c from the command line, for tests/test_tokenizer.py.
 *
 *   gcc -O2 -I. tests/tok_driver.c tokenizer.c -o tok_driver
 *
 *   tok_driver -m model.bin         [opts] FILE...   the tokenizer section of a model.bin
 *   tok_driver -s section.bin       [opts] FILE...   a bare tokenizer section
 *   tok_driver -l tokenizer.bin -v N [opts] FILE...  llama2.c's tokenizer.bin, vocabulary N
 *
 * Encoding (the default): each FILE's bytes are encoded and its ids printed on one line,
 * separated by spaces ("ERR" when they don't fit in -n ids).
 * -d: decoding. Each FILE holds ids separated by white space; the bytes of their pieces are
 *     written to stdout, raw, or with -x as one line of hex per FILE.
 * -n N: room for at most N ids per FILE (default: 3 x the file's length + 16).
 * -c: only build the tokenizer, print the vocabulary size, and exit.
 * -F N: robustness (-m or -s only): N times, build a tokenizer from a damaged copy of the
 *     section (cut short at evenly spaced lengths, or with a few bytes overwritten at random,
 *     seeded, so every run is the same) and encode every FILE with those that build; prints how
 *     many built. Meant for a sanitizer build: what it checks is that nothing crashes.
 * Exit status: 0, 1 when the tokenizer can't be built (the reason on stderr), 2 on bad usage
 * or an unreadable FILE, 3 when some FILE's ids did not fit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "leankv.h"

/* the whole file into a malloc'd buffer (NULL on failure), its length in *n */
static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
        if (len == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) { free(buf); buf = NULL; }
            buf = nb;
        }
    }
    fclose(f);
    *n = len;
    return buf;
}

/* the tokenizer section of a model.bin, after checking the header, into a malloc'd buffer */
static uint8_t *read_model_section(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "tok_driver: cannot open %s\n", path); return NULL; }
    unsigned char raw[LKV_HEADER_BYTES];
    LkvHeader h;
    uint8_t *sec = NULL;
    if (fread(raw, 1, sizeof raw, f) != sizeof raw) {
        fprintf(stderr, "tok_driver: %s: shorter than the header\n", path);
        goto done;
    }
    memcpy(&h, raw, sizeof h);   /* the field offsets of LkvHeader are the file's */
    if (h.magic != LKV_MAGIC || h.version != LKV_VERSION) {
        fprintf(stderr, "tok_driver: %s: not a model.bin (magic %08x, version %d)\n", path,
                h.magic, h.version);
        goto done;
    }
    if (fseek(f, 0, SEEK_END) != 0) goto done;
    long size = ftell(f);
    if (size < 0 || (uint64_t)size != h.file_bytes || h.tokenizer_bytes == 0 ||
        h.tokenizer_offset > (uint64_t)size ||
        h.tokenizer_bytes > (uint64_t)size - h.tokenizer_offset) {
        fprintf(stderr, "tok_driver: %s: file is %ld bytes, header says %llu, tokenizer at "
                "%llu+%llu\n", path, size, (unsigned long long)h.file_bytes,
                (unsigned long long)h.tokenizer_offset, (unsigned long long)h.tokenizer_bytes);
        goto done;
    }
    sec = malloc(h.tokenizer_bytes);
    if (!sec || fseek(f, (long)h.tokenizer_offset, SEEK_SET) != 0 ||
        fread(sec, 1, h.tokenizer_bytes, f) != h.tokenizer_bytes) {
        fprintf(stderr, "tok_driver: %s: cannot read the tokenizer section\n", path);
        free(sec);
        sec = NULL;
        goto done;
    }
    *n = h.tokenizer_bytes;
done:
    fclose(f);
    return sec;
}

/* xorshift64: a fixed sequence of pseudo-random numbers for -F */
static uint64_t next_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* -F: damaged copies of sec; returns how many of them built */
static int robustness(const uint8_t *sec, size_t size, int rounds, char **files, int n_files) {
    uint8_t *copy = malloc(size ? size : 1);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    int built = 0;
    for (int r = 0; r < rounds && copy; r++) {
        size_t n = size;
        memcpy(copy, sec, size);
        if (r % 2 == 0) {
            n = (size_t)((double)size * r / rounds);   /* cut short */
        } else {
            int k = r % 4 == 1 ? 1 + (int)(next_rand(&rng) % 8) : 1;
            for (int j = 0; j < k && size; j++) {
                /* one round in four hits the first 64 bytes: the counts live there */
                size_t span = (j == 0 && r % 8 == 1 && size > 64) ? 64 : size;
                copy[next_rand(&rng) % span] = (uint8_t)next_rand(&rng);
            }
        }
        Tokenizer *t = NULL;
        char err[256];
        if (build_tokenizer(&t, copy, n, err, sizeof err) != 0) {
            if (!memchr(err, 0, sizeof err) || !err[0]) {
                fprintf(stderr, "tok_driver: a failed build gave no reason\n");
                abort();
            }
            continue;
        }
        built++;
        for (int f = 0; f < n_files; f++) {
            size_t len;
            char *data = read_file(files[f], &len);
            int room = 3 * (int)len + 16, *ids = malloc((size_t)room * sizeof *ids);
            int got = data && ids ? tokenizer_encode(t, data, len, ids, room) : -1;
            for (int k = 0; k < got; k++) {
                int plen;
                tokenizer_piece(t, ids[k], &plen);
            }
            free(ids);
            free(data);
        }
        free_tokenizer(t);
    }
    free(copy);
    printf("built %d of %d damaged sections\n", built, rounds);
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: tok_driver (-m model.bin | -s section.bin | -l tokenizer.bin -v N) "
                    "[-d [-x]] [-n N] [-c] [-F N] FILE...\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *model = NULL, *section = NULL, *legacy = NULL;
    int vocab = 0, decode = 0, hex = 0, check = 0, max_ids = -1, fuzz = 0, i;
    for (i = 1; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(a, "-m") && has_val) model = argv[++i];
        else if (!strcmp(a, "-s") && has_val) section = argv[++i];
        else if (!strcmp(a, "-l") && has_val) legacy = argv[++i];
        else if (!strcmp(a, "-v") && has_val) vocab = atoi(argv[++i]);
        else if (!strcmp(a, "-n") && has_val) max_ids = atoi(argv[++i]);
        else if (!strcmp(a, "-d")) decode = 1;
        else if (!strcmp(a, "-x")) hex = 1;
        else if (!strcmp(a, "-c")) check = 1;
        else if (!strcmp(a, "-F") && has_val) fuzz = atoi(argv[++i]);
        else return usage();
    }
    if (!!model + !!section + !!legacy != 1) return usage();

    Tokenizer *t = NULL;
    char err[256] = "";
    int rc;
    if (legacy) {
        rc = build_tokenizer_legacy(&t, legacy, vocab, err, sizeof err);
    } else {
        size_t n = 0;
        uint8_t *sec = model ? read_model_section(model, &n) : (uint8_t *)read_file(section, &n);
        if (!sec) {
            if (section) fprintf(stderr, "tok_driver: cannot read %s\n", section);
            return 1;
        }
        if (fuzz > 0) {
            robustness(sec, n, fuzz, argv + i, argc - i);
            free(sec);
            return 0;
        }
        rc = build_tokenizer(&t, sec, n, err, sizeof err);
        free(sec);   /* the tokenizer keeps copies of what it needs */
    }
    if (rc != 0) {
        fprintf(stderr, "tok_driver: %s\n", err);
        return 1;
    }
    if (check) {
        printf("%d\n", tokenizer_vocab_size(t));
        free_tokenizer(t);
        return 0;
    }

    int status = 0;
    for (; i < argc; i++) {
        size_t n;
        char *data = read_file(argv[i], &n);
        if (!data) {
            fprintf(stderr, "tok_driver: cannot read %s\n", argv[i]);
            status = 2;
            continue;
        }
        if (decode) {
            char *buf = malloc(n + 1), *end;   /* strtol needs a terminated string */
            if (!buf) { free(data); status = 2; continue; }
            memcpy(buf, data, n);
            buf[n] = 0;
            for (char *p = buf;; p = end) {
                long id = strtol(p, &end, 10);
                if (end == p) break;
                int len;
                const char *s = tokenizer_piece(t, (int)id, &len);
                if (!s) {
                    fprintf(stderr, "tok_driver: %s: bad id %ld\n", argv[i], id);
                    status = 2;
                    continue;
                }
                if (hex) for (int k = 0; k < len; k++) printf("%02x", (unsigned char)s[k]);
                else fwrite(s, 1, (size_t)len, stdout);
            }
            if (hex) printf("\n");
            free(buf);
        } else {
            /* room for the worst case: a bad byte is a U+FFFD of 3 bytes, one id each */
            int room = max_ids >= 0 ? max_ids : 3 * (int)n + 16;
            int *ids = malloc(((size_t)room + 1) * sizeof *ids);
            int got = ids ? tokenizer_encode(t, data, n, ids, room) : -1;
            if (got < 0) { printf("ERR\n"); status = 3; }
            else {
                for (int k = 0; k < got; k++) printf(k ? " %d" : "%d", ids[k]);
                printf("\n");
            }
            free(ids);
        }
        free(data);
    }
    free_tokenizer(t);
    return status;
}
