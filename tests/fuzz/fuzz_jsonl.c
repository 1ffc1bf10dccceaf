/* fuzz_jsonl.c: the request reader of -f (leankv.c parse_requests and the JSON reader under
 * it) on arbitrary bytes, with the tiny byte-level BPE of tests/fuzz/data/tiny_bpe.tok, a
 * context of 64 tokens and -n 8. Input: the request file.
 * Properties: it returns requests or NULL with a one-line reason; nothing leaks; every request
 * has an id and a prompt, "n" and "temperature" within their ranges, and either an error or
 * 1..ctx-1 prompt ids of the vocabulary with room for what may be generated; the JSON writer
 * takes every id and prompt. */
#include "fuzz_leankv.h"

static Model model;
static Options opts;
static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    const char *dir = getenv("LKV_FUZZ_DATA") ? getenv("LKV_FUZZ_DATA") : "tests/fuzz/data";
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny_bpe.tok", dir);
    size_t len;
    char *sec = read_file(path, &len);
    char err[256];
    if (build_tokenizer(&model.tok, (const uint8_t *)sec, len, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_jsonl: %s: %s\n", path, err);
        abort();
    }
    free(sec);
    model.c.vocab_size = tokenizer_vocab_size(model.tok);
    model.c.add_bos = 1;
    model.c.bos_id = 1;
    opts.file = "fuzz.jsonl";
    opts.ctx = 64;
    opts.steps = 8;
    opts.temperature = 1.0f;
    devnull = fopen("/dev/null", "w");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model.tok) LLVMFuzzerInitialize(NULL, NULL);
    char *text = malloc(size ? size : 1);   /* exactly size bytes, no NUL: as read_file's
                                               bytes would be read up to len */
    memcpy(text, data, size);
    char err[256] = "";
    int n = 0;
    Request *reqs = NULL;
    if (!TRY(reqs = parse_requests(&model, &opts, text, size, &n, err, sizeof err))) {
        check_die_message();   /* only out of memory dies here */
    } else if (!reqs) {
        assert(err[0] && !strchr(err, '\n'));
    } else {
        assert(n >= 1);
        for (int i = 0; i < n; i++) {
            Request *r = &reqs[i];
            assert(r->id && r->prompt);
            assert(r->max_new >= 1 && r->temperature >= 0 && r->temperature <= 100);
            if (r->error) { assert(r->n_prompt == 0); }
            else {
                assert(r->n_prompt >= 1 && r->n_prompt < opts.ctx);
                for (int k = 0; k < r->n_prompt; k++)
                    assert(r->ids[k] >= 0 && r->ids[k] < model.c.vocab_size);
                int room = r->max_new < opts.ctx - r->n_prompt ? r->max_new : opts.ctx - r->n_prompt;
                r->ids[r->n_prompt + room - 1] = 0;   /* the last slot request_push() may use */
            }
            json_write_string(devnull, r->id, strlen(r->id));
            json_write_string(devnull, r->prompt, strlen(r->prompt));
        }
        free_requests(reqs, n);
    }
    free(text);
    return 0;
}
