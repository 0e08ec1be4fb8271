#include "vec.h"

#include <stdlib.h>

void vec_push(vec *v, double x) {
    if (v->len == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 8;
        v->items = realloc(v->items, v->cap * sizeof *v->items);
        if (!v->items) abort();
    }
    v->items[v->len++] = x;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void vec_sort(vec *v) { qsort(v->items, v->len, sizeof *v->items, cmp); }

void vec_free(vec *v) {
    free(v->items);
    v->items = NULL;
    v->len = v->cap = 0;
}
