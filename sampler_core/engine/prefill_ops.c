/* A long prefill's small steps between the products, one pass each instead of torch's five or
 * six (rotary: cat, neg, two muls and an add per tensor, then copies into the cache and a
 * contiguous copy of the queries; SiLU: silu, then a mul). Same arithmetic as the decode
 * step's (packed_kernel.c's rope and silu_times), row by row, on the pool's threads.
 */
#include <stdint.h>
#include <string.h>

#include "kernel_common.h"

enum { ROWS_PER_CHUNK = 16 };

typedef struct {
    const float *qkv, *cos, *sin;
    float *q, *keys, *values;
    int steps, heads, kv_heads, dim, capacity, start;
} split_job;

static void split_chunk(const void* job, int c) {
    const split_job* j = job;
    const int width = (j->heads + 2 * j->kv_heads) * j->dim;
    const int t1 = (c + 1) * ROWS_PER_CHUNK < j->steps ? (c + 1) * ROWS_PER_CHUNK : j->steps;
    for (int t = c * ROWS_PER_CHUNK; t < t1; t++) {
        const float* row = j->qkv + (size_t)t * width;
        const float *cos = j->cos + (size_t)t * j->dim, *sin = j->sin + (size_t)t * j->dim;
        for (int h = 0; h < j->heads; h++) {
            float* q = j->q + ((size_t)h * j->steps + t) * j->dim;
            memcpy(q, row + h * j->dim, j->dim * sizeof(float));
            rope(q, cos, sin, j->dim);
        }
        for (int h = 0; h < j->kv_heads; h++) {
            const size_t at = ((size_t)h * j->capacity + j->start + t) * j->dim;
            memcpy(j->keys + at, row + (j->heads + h) * j->dim, j->dim * sizeof(float));
            rope(j->keys + at, cos, sin, j->dim);
            memcpy(j->values + at, row + (j->heads + j->kv_heads + h) * j->dim,
                   j->dim * sizeof(float));
        }
    }
}

/* Split ``steps`` rows of fused q/k/v outputs ([steps, (heads + 2 kv_heads) * dim]): the
 * queries, rotated, into q [heads, steps, dim]; the keys, rotated, and the values into one
 * layer's cache ([kv_heads, capacity, dim]) at positions start .. start + steps - 1. cos and
 * sin: [steps, dim], the rotary table's rows for those positions. */
void prefill_split_heads(const float* qkv, int steps, int heads, int kv_heads, int dim,
                         const float* cos, const float* sin, float* q, float* keys,
                         float* values, int capacity, int start) {
    const split_job job = {qkv, cos, sin, q, keys, values, steps, heads, kv_heads, dim,
                           capacity, start};
    parallel(split_chunk, &job, (steps + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK);
}

typedef struct {
    const float* gate_up;
    float* act;
    int steps, intermediate;
} silu_job;

static void silu_chunk(const void* job, int c) {
    const silu_job* j = job;
    const int t1 = (c + 1) * ROWS_PER_CHUNK < j->steps ? (c + 1) * ROWS_PER_CHUNK : j->steps;
    for (int t = c * ROWS_PER_CHUNK; t < t1; t++) {
        const float* gate = j->gate_up + (size_t)t * 2 * j->intermediate;
        silu_times(gate, gate + j->intermediate, j->intermediate,
                   j->act + (size_t)t * j->intermediate);
    }
}

/* act[t] = silu(gate[t]) * up[t] for the rows of gate_up [steps, 2 * intermediate] (gate,
 * then up); act: [steps, intermediate]. */
void prefill_silu_times(const float* gate_up, int steps, int intermediate, float* act) {
    const silu_job job = {gate_up, act, steps, intermediate};
    parallel(silu_chunk, &job, (steps + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK);
}
