/* fuzz_flags.c: the command line (leankv.c parse_options) on arbitrary arguments.
 * Input: the arguments after "leankv", separated by NUL bytes (at most 64).
 * Properties: it parses or dies with one line; what it accepts is within the documented
 * limits (the checks below restate README's flag table). */
#include "fuzz_leankv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = 0;
    char *argv[66];
    int argc = 0;
    argv[argc++] = "leankv";
    for (size_t i = 0; i <= size && argc < 65;) {
        argv[argc++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    argv[argc] = NULL;
    Options o;
    optind = 0;   /* glibc: start getopt afresh */
    if (TRY(parse_options(&o, argc, argv))) {
        if (!o.help) {
            assert(o.model_path != NULL);
            assert(o.temperature >= 0 && isfinite(o.temperature));
            assert(o.topp > 0 && o.topp <= 1);
            assert(o.steps >= 0 && (o.ctx == -1 || o.ctx >= 1));
            assert(o.batch >= 0 && o.requests >= 0 && o.prompt_len >= 1 && o.gen_len >= 1);
            /* prefill_chunk 0, as batch 0: the device's default, which main() picks */
            assert(o.prefill_chunk >= 0 && o.prefill_chunk <= 4096);
            assert(o.ppl_prefill >= 0 && o.ctx_len >= 1 && o.trials >= 1);
            assert(o.swap_mib <= (size_t)1 << 24);
            assert(o.kv.kbits == 32 || o.kv.kbits == 16 || o.kv.kbits == 8 || o.kv.kbits == 4 ||
                   o.kv.kbits == 2);
            assert(o.kv.groups >= 1);
        }
    } else {
        check_die_message();
    }
    free(buf);
    return 0;
}
