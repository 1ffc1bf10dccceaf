/* quant_driver: runs leankv.h's quantization (section 4b) over a file of vectors, for
 * tests/test_quant.py to compare with its own numpy implementation.
 *
 *   quant_driver IN OUT d bits groups
 *
 * IN holds n vectors of d float32 (native byte order). OUT gets, per vector, its codes
 * (lkv_code_bytes), its scale/zero pairs (lkv_sz_bytes) and the dequantized vector (d float32),
 * in that order. */
#include <stdio.h>
#include <stdlib.h>

#include "leankv.h"

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s IN OUT d bits groups\n", argv[0]); return 2; }
    int d = atoi(argv[3]), bits = atoi(argv[4]), groups = atoi(argv[5]);
    int ok_bits = bits == 2 || bits == 4 || bits == 8 || bits == 16 || bits == 32;
    if (!ok_bits || d <= 0 || d > LKV_MAX_HEAD_DIM || groups <= 0 || d % groups ||
        (bits < 8 && (d / groups) % (8 / bits))) {
        fprintf(stderr, "quant_driver: bad setting d %d bits %d groups %d\n", d, bits, groups);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) { perror("quant_driver"); return 1; }
    int cb = lkv_code_bytes(d, bits), sb = lkv_sz_bytes(groups, bits);
    float x[LKV_MAX_HEAD_DIM], y[LKV_MAX_HEAD_DIM];
    uint8_t *codes = malloc(4 * LKV_MAX_HEAD_DIM);   /* untyped: 16/32 bits store through */
    uint16_t sz[2 * LKV_MAX_HEAD_DIM];                 /* uint16_t / float pointers */
    if (!codes) { perror("quant_driver"); return 1; }
    size_t n = 0;
    while (fread(x, sizeof(float), d, in) == (size_t)d) {
        lkv_quantize(x, d, bits, groups, codes, sz);
        lkv_dequantize(codes, sz, d, bits, groups, y);
        if (fwrite(codes, 1, cb, out) != (size_t)cb || fwrite(sz, 1, sb, out) != (size_t)sb ||
            fwrite(y, sizeof(float), d, out) != (size_t)d) { perror("quant_driver"); return 1; }
        n++;
    }
    if (ferror(in) || fclose(out)) { perror("quant_driver"); return 1; }
    fclose(in);
    free(codes);
    fprintf(stderr, "quant_driver: %zu vectors\n", n);
    return 0;
}
