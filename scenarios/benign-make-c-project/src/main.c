#include <stdio.h>
#include <stdlib.h>

#include "stats.h"

int main(int argc, char **argv) {
    vec v = {0};
    for (int i = 1; i < argc; i++) vec_push(&v, strtod(argv[i], NULL));
    printf("n=%zu mean=%.4f median=%.4f stddev=%.4f\n", v.len, mean(&v), median(&v), stddev(&v));
    vec_free(&v);
    return 0;
}
