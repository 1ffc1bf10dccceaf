/* check.h: the assertion counter shared by the C unit tests (test_cache.c, test_quant.c).
 * CHECK counts a pass or prints the failure with its place; a test's main() ends with
 * check_summary(), whose line "N passed, M failed" pytest reads. */
#ifndef LEANKV_CHECK_H
#define LEANKV_CHECK_H
#include <stdio.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                            \
    do {                                                                            \
        if (cond) n_pass++;                                                         \
        else { n_fail++; printf("FAIL %s:%d: ", __FILE__, __LINE__);                \
               printf(__VA_ARGS__); printf("\n"); }                                 \
    } while (0)

static int check_summary(void) {
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
#endif
