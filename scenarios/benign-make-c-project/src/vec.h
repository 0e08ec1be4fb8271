#ifndef VEC_H
#define VEC_H
#include <stddef.h>

typedef struct {
    double *items;
    size_t len, cap;
} vec;

void vec_push(vec *v, double x);
void vec_sort(vec *v);
void vec_free(vec *v);
#endif
