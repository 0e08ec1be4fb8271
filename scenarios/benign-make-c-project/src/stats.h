#ifndef STATS_H
#define STATS_H
#include "vec.h"

double mean(const vec *v);
double median(vec *v);
double stddev(const vec *v);
#endif
