#include "stats.h"

#include <math.h>

double mean(const vec *v) {
    double sum = 0;
    for (size_t i = 0; i < v->len; i++) sum += v->items[i];
    return v->len ? sum / v->len : 0;
}

double median(vec *v) {
    if (!v->len) return 0;
    vec_sort(v);
    size_t mid = v->len / 2;
    return v->len % 2 ? v->items[mid] : (v->items[mid - 1] + v->items[mid]) / 2;
}

double stddev(const vec *v) {
    double m = mean(v), acc = 0;
    for (size_t i = 0; i < v->len; i++) acc += (v->items[i] - m) * (v->items[i] - m);
    return v->len > 1 ? sqrt(acc / (v->len - 1)) : 0;
}
