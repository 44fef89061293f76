/* Causal attention for a prefill, float32, in one pass over the keys (online softmax).
 *
 * torch's fused CPU attention reaches about 60% of this machine's float32 rate on a causal
 * 2,000-position prefill (the non-causal one runs faster per product). Here each chunk takes
 * 32 query positions of one head, one position a lane of two vectors (``query_lanes``), and
 * walks the keys up to the last one they may see, 64 keys a step: a key's scores for the 32
 * positions are two FMAs a dimension with the key's element broadcast once into a register,
 * masked past each position's own; then the running maxima, the exponentials and the running
 * sums, all down the lanes; and the exponential-weighted values added into the outputs, a
 * value element broadcast the same way. (16 positions, one FMA a broadcast straight from
 * memory, ran ~5% slower on a Zen 5, bit for bit the same.) Keys and values are read as the
 * cache holds them.
 * (Lanes along keys, four positions at a time, needed a separate broadcast for every four
 * FMAs, the keys transposed on every call, and reductions across lanes each step: 7% slower
 * at 2,000 positions; the ``fast`` variant below still runs that way.) Chunks are claimed
 * longest first, so the threads finish together. Each output is summed by one thread in a
 * fixed order, the same whatever positions share its vector: results do not depend on the
 * number of threads, nor on which positions a call computes.
 *
 * The arithmetic is float32 throughout: only the order of the sums (and exp16's last bit)
 * differ from the reference's softmax(q k^T * scale) v. The opt-in ``fast`` prefill instead
 * rounds queries, keys, values and the exponentials to bfloat16 and multiplies them in pairs
 * (VDPBF16PS: twice the products of an FMA), accumulating in float32; not exact.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "kernel_common.h"

#define BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,fma")))

enum { QUERY_BLOCK = 32, KEY_STEP = 64, Q_ROWS = 4, LANES = 16, MAX_DIM = 256 };

typedef struct {
    const float* q;      /* [heads, steps, dim], rotated */
    const float* keys;   /* [kv_heads, capacity, dim] */
    const float* values; /* [kv_heads, capacity, dim] */
    /* For ``bf16``, in bfloat16, pairs of neighbours side by side for VDPBF16PS: */
    uint16_t* kt16;      /* [kv_heads, key steps, dim / 2, KEY_STEP, 2]: (k[d], k[d + 1]) */
    uint16_t* vt16;      /* [kv_heads, key steps, KEY_STEP / 2, dim, 2]: (v[t][x], v[t + 1][x]) */
    uint16_t* q16;       /* [heads, steps, dim] */
    float* out;          /* [steps, heads * dim] */
    int capacity, start, steps, context, heads, group, dim, query_blocks, bf16;
    float scale;
} prefill_attention_job;

/* float32 to bfloat16, rounding to nearest even (as VCVTNEPS2BF16 does for numbers). */
static inline uint16_t to_bf16(float x) {
    union { float f; uint32_t u; } v = {x};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline int key_steps(int context) { return (context + KEY_STEP - 1) / KEY_STEP; }

/* Floats of scratch prefill_attention needs: the bfloat16 variant's keys, values and queries;
 * none in float32. */
size_t prefill_attention_scratch_floats(int heads, int kv_heads, int dim, int start, int steps,
                                        int bf16) {
    if (!bf16) return 0;
    return (size_t)kv_heads * key_steps(start + steps) * dim * KEY_STEP
           + ((size_t)heads * steps * dim + 1) / 2;
}

/* Whether this CPU runs the bfloat16 variant (AVX-512 BF16). */
int prefill_attention_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
}

/* The largest head this kernel takes (stack buffers hold a chunk's queries and outputs). */
int prefill_attention_max_dim(void) { return MAX_DIM; }

/* Chunk c (bfloat16 only): step c % steps of 64 keys of kv head c / steps in bfloat16, the
 * keys as [dim / 2, 64, 2] and the values as [32, dim, 2] (zeros past the context): a step's
 * products then read contiguous runs, lanes along keys for the scores. */
static void transpose_keys(const void* job, int c) {
    const prefill_attention_job* j = job;
    const int kv = c / key_steps(j->context), step = c % key_steps(j->context);
    const float* k = j->keys + (size_t)kv * j->capacity * j->dim;
    const float* v = j->values + (size_t)kv * j->capacity * j->dim;
    const size_t at = ((size_t)kv * key_steps(j->context) + step) * j->dim * KEY_STEP;
    uint16_t *block = j->kt16 + at, *values = j->vt16 + at;
    for (int t = 0; t < KEY_STEP; t++) {
        const int key = step * KEY_STEP + t;
        for (int d = 0; d < j->dim; d++) {
            const int inside = key < j->context;
            const size_t from = (size_t)key * j->dim + d;
            block[((d / 2) * KEY_STEP + t) * 2 + d % 2] = inside ? to_bf16(k[from]) : 0;
            values[((t / 2) * j->dim + d) * 2 + t % 2] = inside ? to_bf16(v[from]) : 0;
        }
    }
}

/* Chunk h: head h's queries in bfloat16. */
static void convert_queries(const void* job, int h) {
    const prefill_attention_job* j = job;
    const size_t n = (size_t)j->steps * j->dim, at = (size_t)h * n;
    for (size_t i = 0; i < n; i++) j->q16[at + i] = to_bf16(j->q[at + i]);
}

/* R query positions (i0 .. i0 + R - 1 of the prompt) of head h in bfloat16 products, lanes
 * along keys; R is a constant where inlined. */
BF16 static inline __attribute__((always_inline)) void query_rows(
    const prefill_attention_job* j, int h, int i0, const int R) {
    const int dim = j->dim, kv = h / j->group, vectors = dim / 16;
    const size_t step_size = (size_t)dim * KEY_STEP; /* elements of one step of kt16 or vt16 */
    const uint16_t* kt16 = j->kt16 + (size_t)kv * key_steps(j->context) * step_size;
    const uint16_t* vt16 = j->vt16 + (size_t)kv * key_steps(j->context) * step_size;
    const uint16_t* q16 = j->q16 + ((size_t)h * j->steps + i0) * dim;
    float o[Q_ROWS][MAX_DIM], top[Q_ROWS], total[Q_ROWS];
    uint16_t p16[Q_ROWS][KEY_STEP]; /* the step's weights in bfloat16 */
    for (int r = 0; r < R; r++) {
        top[r] = -INFINITY;
        total[r] = 0.0f;
        for (int x = 0; x < dim; x++) o[r][x] = 0.0f;
    }
    const int last = j->start + i0 + R - 1; /* the last key any of these rows sees */
    for (int k0 = 0; k0 <= last; k0 += KEY_STEP) {
        /* Scores of the R rows against keys k0 .. k0 + 63, lanes along keys. */
        __m512 s[Q_ROWS][KEY_STEP / 16];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < KEY_STEP / 16; c++) s[r][c] = _mm512_setzero_ps();
        for (int d = 0; d < dim; d += 2) { /* a pair of dimensions a product */
            const uint16_t* row = kt16 + (size_t)(k0 / KEY_STEP) * step_size + d * KEY_STEP;
            __m512bh keys[KEY_STEP / 16];
            for (int c = 0; c < KEY_STEP / 16; c++)
                keys[c] = (__m512bh)_mm512_loadu_si512(row + 32 * c);
            for (int r = 0; r < R; r++) {
                const __m512bh qd = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t*)(q16 + (size_t)r * dim + d));
                for (int c = 0; c < KEY_STEP / 16; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], qd, keys[c]);
            }
        }
        /* Mask keys past each row's position; update its maximum, sum and output scale. The
         * scale is applied inside the exponential's argument (fmsub): for a power of two it
         * is exact, so this equals scaling the scores first. */
        const __m512 scale = _mm512_set1_ps(j->scale);
        for (int r = 0; r < R; r++) {
            const int sees = j->start + i0 + r + 1; /* keys 0 .. sees - 1 */
            __mmask16 valid[KEY_STEP / 16];
            __m512 most = _mm512_set1_ps(-INFINITY);
            for (int c = 0; c < KEY_STEP / 16; c++) {
                const int first = k0 + 16 * c;
                valid[c] = first >= sees ? 0 : lanes_before(first, sees);
                most = _mm512_mask_max_ps(most, valid[c], most, s[r][c]);
            }
            if (!valid[0]) { /* nothing to see in this step (a later row's keys) */
                for (int c = 0; c < KEY_STEP / 16; c++)
                    _mm256_storeu_si256((__m256i*)(p16[r] + 16 * c), _mm256_setzero_si256());
                continue;
            }
            const float step_top = _mm512_reduce_max_ps(most) * j->scale;
            const float new_top = step_top > top[r] ? step_top : top[r];
            /* 0 on the first step; 1 (no call) while the maximum holds, as it mostly does. */
            const float rescale = new_top == top[r] ? 1.0f : expf(top[r] - new_top);
            const __m512 shift = _mm512_set1_ps(new_top);
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < KEY_STEP / 16; c++) {
                const __m512 e = _mm512_maskz_mov_ps(valid[c], exp16(_mm512_fmsub_ps(s[r][c], scale, shift)));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i*)(p16[r] + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
            }
            total[r] = total[r] * rescale + _mm512_reduce_add_ps(sum);
            top[r] = new_top;
            if (rescale != 1.0f)
                for (int x = 0; x < dim; x++) o[r][x] *= rescale;
        }
        /* Outputs += p . values, 64 dimensions of the R rows at a time, in registers. */
        const int k1 = k0 + KEY_STEP < last + 1 ? k0 + KEY_STEP : last + 1;
        for (int x0 = 0; x0 < vectors; x0 += 4) {
            const int n = vectors - x0 < 4 ? vectors - x0 : 4;
            __m512 acc[Q_ROWS][4];
            for (int r = 0; r < R; r++)
                for (int x = 0; x < 4; x++)
                    acc[r][x] = x < n ? _mm512_loadu_ps(o[r] + 16 * (x0 + x)) : _mm512_setzero_ps();
            for (int t = k0; t < k1; t += 2) { /* a pair of keys a product, lanes along dimensions */
                const uint16_t* vt = vt16 + (size_t)(k0 / KEY_STEP) * step_size
                                     + ((size_t)(t - k0) / 2 * dim + 16 * x0) * 2;
                __m512bh value[4];
                for (int x = 0; x < 4; x++)
                    value[x] = (__m512bh)(x < n ? _mm512_loadu_si512(vt + 32 * x) : _mm512_setzero_si512());
                for (int r = 0; r < R; r++) {
                    const __m512bh weight = (__m512bh)_mm512_set1_epi32(
                        *(const int32_t*)(p16[r] + (t - k0)));
                    for (int x = 0; x < 4; x++) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], weight, value[x]);
                }
            }
            for (int r = 0; r < R; r++)
                for (int x = 0; x < 4; x++) /* lanes past ``n`` vectors: not stored */
                    _mm512_mask_storeu_ps(o[r] + 16 * (x0 + x), x < n ? 0xFFFF : 0, acc[r][x]);
        }
    }
    for (int r = 0; r < R; r++) {
        float* out = j->out + (size_t)(i0 + r) * j->heads * dim + (size_t)h * dim;
        const __m512 inv = _mm512_set1_ps(1.0f / total[r]);
        for (int x = 0; x < vectors; x++)
            _mm512_storeu_ps(out + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * x), inv));
    }
}

/* Up to 2 * LANES query positions (i0 .. i0 + R - 1) of head h in float32, one position a
 * lane of two vectors: the scores of a key for all of them are two FMAs per dimension with
 * the key's element broadcast once into a register, and the softmax's maximum and sums run
 * down the lanes (no reductions across them). Keys and values are read as the cache holds
 * them. Each lane does a position's arithmetic in the same order whatever positions share
 * the vectors. */
/* Vectors of query positions a call holds, and keys (dimensions) a tile of scores (outputs)
 * takes: V * TILE accumulators in registers. */
enum { V = 2, TILE = 8 };
static inline __attribute__((always_inline)) void query_lanes(
    const prefill_attention_job* j, int h, int i0, int R, const int dim) {
    const int kv = h / j->group;
    const float* k = j->keys + (size_t)kv * j->capacity * dim;
    const float* v = j->values + (size_t)kv * j->capacity * dim;
    const float* q = j->q + ((size_t)h * j->steps + i0) * dim;
    float qt[MAX_DIM][V * LANES] __attribute__((aligned(64))); /* queries, a dimension a row */
    float ot[MAX_DIM][V * LANES] __attribute__((aligned(64))); /* outputs, the same way */
    float p[KEY_STEP][V * LANES] __attribute__((aligned(64)));  /* a step's scores, then weights */
    float tail[TILE * MAX_DIM];                                  /* a step's last keys, padded */
    __mmask16 rows[V];
    for (int x = 0; x < V; x++) {
        const int r = R - x * LANES;
        rows[x] = r <= 0 ? 0 : r >= LANES ? 0xFFFF : (__mmask16)((1u << r) - 1);
    }
    const __m512i row_at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(dim)); /* lane r: q + r * dim */
    for (int d = 0; d < dim; d++)
        for (int x = 0; x < V; x++) {
            _mm512_store_ps(qt[d] + LANES * x, _mm512_mask_i32gather_ps(
                _mm512_setzero_ps(), rows[x], row_at, q + (size_t)x * LANES * dim + d, 4));
            _mm512_store_ps(ot[d] + LANES * x, _mm512_setzero_ps());
        }
    const int first = j->start + i0; /* lane r of vector x: position first + 16 x + r */
    const int last = first + R - 1;  /* the last key any of them sees */
    const __m512 scale = _mm512_set1_ps(j->scale);
    __m512 top[V], total[V];
    for (int x = 0; x < V; x++) top[x] = _mm512_set1_ps(-INFINITY), total[x] = _mm512_setzero_ps();
    for (int k0 = 0; k0 <= last; k0 += KEY_STEP) {
        const int n = last + 1 - k0 < KEY_STEP ? last + 1 - k0 : KEY_STEP; /* keys this step */
        /* Scores, TILE keys at a time: s[t] += q[d] (lanes) * k[t][d] (broadcast). */
        for (int t0 = 0; t0 < n; t0 += TILE) {
            __m512 s[V][TILE];
#pragma GCC unroll 16
            for (int t = 0; t < TILE; t++)
                for (int x = 0; x < V; x++) s[x][t] = _mm512_setzero_ps();
            const float* kr = k + (size_t)(k0 + t0) * dim;
            if (n - t0 < TILE) { /* the last keys: copied beside zeros (the cache may end here) */
                for (int t = 0; t < TILE; t++)
                    for (int d = 0; d < dim; d++) tail[t * dim + d] = t < n - t0 ? kr[(size_t)t * dim + d] : 0.0f;
                kr = tail;
            }
            for (int d = 0; d < dim; d++) {
                __m512 qd[V];
                for (int x = 0; x < V; x++) qd[x] = _mm512_load_ps(qt[d] + LANES * x);
#pragma GCC unroll 16
                for (int t = 0; t < TILE; t++) {
                    const __m512 kb = _mm512_set1_ps(kr[t * dim + d]);
                    for (int x = 0; x < V; x++) s[x][t] = _mm512_fmadd_ps(qd[x], kb, s[x][t]);
                }
            }
#pragma GCC unroll 16
            for (int t = 0; t < TILE; t++)
                for (int x = 0; x < V; x++) _mm512_store_ps(p[t0 + t] + LANES * x, s[x][t]);
        }
        int rescaled = 0;
        __m512 rescale[V]; /* a vector past the positions (rows[x] == 0) is never stored */
        for (int x = 0; x < V; x++) rescale[x] = _mm512_set1_ps(1.0f);
        for (int x = 0; x < V; x++) {
            if (!rows[x]) continue;
            /* The lanes that see key k0 + t: positions at or past it. */
            __m512 most = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < n; t++) {
                const int from = k0 + t - first - LANES * x; /* the first lane that sees it */
                if (from >= LANES) break;
                const __mmask16 sees = from <= 0 ? rows[x] : (__mmask16)(rows[x] & ~((1u << from) - 1));
                most = _mm512_mask_max_ps(most, sees, most, _mm512_load_ps(p[t] + LANES * x));
            }
            /* The scale inside the exponential's argument (fmsub), exact for a power of two. */
            const __m512 new_top = _mm512_max_ps(top[x], _mm512_mul_ps(most, scale));
            rescale[x] = exp16(_mm512_sub_ps(top[x], new_top)); /* 1 where it held, 0 first */
            __m512 sum = _mm512_setzero_ps();
            for (int t = 0; t < n; t++) {
                const int from = k0 + t - first - LANES * x;
                const __mmask16 sees = from <= 0 ? rows[x]
                                     : from >= LANES ? 0 : (__mmask16)(rows[x] & ~((1u << from) - 1));
                const __m512 e = _mm512_maskz_mov_ps(sees, exp16(_mm512_fmsub_ps(_mm512_load_ps(p[t] + LANES * x), scale, new_top)));
                _mm512_store_ps(p[t] + LANES * x, e);
                sum = _mm512_add_ps(sum, e);
            }
            total[x] = _mm512_fmadd_ps(total[x], rescale[x], sum);
            top[x] = new_top;
            rescaled |= _mm512_mask_cmp_ps_mask(rows[x], rescale[x], _mm512_set1_ps(1.0f), _CMP_NEQ_UQ) != 0;
        }
        /* Outputs += weights . values, TILE dimensions at a time, keys in order. */
        for (int d0 = 0; d0 < dim; d0 += TILE) {
            __m512 acc[V][TILE];
#pragma GCC unroll 16
            for (int y = 0; y < TILE; y++)
                for (int x = 0; x < V; x++)
                    acc[x][y] = rescaled ? _mm512_mul_ps(_mm512_load_ps(ot[d0 + y] + LANES * x), rescale[x])
                                         : _mm512_load_ps(ot[d0 + y] + LANES * x);
            const float* vr = v + (size_t)k0 * dim + d0;
            for (int t = 0; t < n; t++) {
                __m512 w[V];
                for (int x = 0; x < V; x++) w[x] = _mm512_load_ps(p[t] + LANES * x);
#pragma GCC unroll 16
                for (int y = 0; y < TILE; y++) {
                    const __m512 vb = _mm512_set1_ps(vr[(size_t)t * dim + y]);
                    for (int x = 0; x < V; x++) acc[x][y] = _mm512_fmadd_ps(w[x], vb, acc[x][y]);
                }
            }
#pragma GCC unroll 16
            for (int y = 0; y < TILE; y++)
                for (int x = 0; x < V; x++) _mm512_store_ps(ot[d0 + y] + LANES * x, acc[x][y]);
        }
    }
    const __m512i out_at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(j->heads * dim)); /* lane r's row */
    for (int x = 0; x < V; x++) {
        if (!rows[x]) continue;
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), total[x]);
        float* out = j->out + (size_t)(i0 + LANES * x) * j->heads * dim + (size_t)h * dim;
        for (int d = 0; d < dim; d++)
            _mm512_mask_i32scatter_ps(out + d, rows[x], out_at, _mm512_mul_ps(_mm512_load_ps(ot[d] + LANES * x), inv), 4);
    }
}

/* Chunk c: one head's block of QUERY_BLOCK positions, the longest (latest) blocks first. */
BF16 static void query_block(const void* job, int c) {
    const prefill_attention_job* j = job;
    const int h = c % j->heads, block = j->query_blocks - 1 - c / j->heads;
    const int i1 = (block + 1) * QUERY_BLOCK < j->steps ? (block + 1) * QUERY_BLOCK : j->steps;
    if (!j->bf16) {
        for (int i = block * QUERY_BLOCK; i < i1; i += V * LANES) {
            const int R = i1 - i < V * LANES ? i1 - i : V * LANES;
            if (j->dim == 64) /* the default model's heads: offsets known when compiled */
                query_lanes(j, h, i, R, 64);
            else
                query_lanes(j, h, i, R, j->dim);
        }
        return;
    }
    for (int i = block * QUERY_BLOCK; i < i1; i += Q_ROWS)
        switch (i1 - i < Q_ROWS ? i1 - i : Q_ROWS) {
            case 1: query_rows(j, h, i, 1); break;
            case 2: query_rows(j, h, i, 2); break;
            case 3: query_rows(j, h, i, 3); break;
            default: query_rows(j, h, i, 4); break;
        }
}

/* out[t, h * dim ...] = softmax(q[h, t] . keys[0 .. start + t] * scale) . values, for the
 * ``steps`` new positions start .. start + steps - 1 whose keys and values are already in the
 * cache; products in bfloat16 when ``bf16`` (see above). dim must be a multiple of 16 and at
 * most MAX_DIM; ``scratch`` holds prefill_attention_scratch_floats(...) floats. */
void prefill_attention(const float* q, const float* keys, const float* values, int capacity,
                       int heads, int kv_heads, int dim, int start, int steps, float scale,
                       float* out, float* scratch, int bf16) {
    const int context = start + steps, query_blocks = (steps + QUERY_BLOCK - 1) / QUERY_BLOCK;
    uint16_t* kt16 = (uint16_t*)scratch;
    uint16_t* vt16 = kt16 + (size_t)kv_heads * key_steps(context) * dim * KEY_STEP;
    uint16_t* q16 = vt16 + (size_t)kv_heads * key_steps(context) * dim * KEY_STEP;
    const prefill_attention_job job = {q, keys, values, kt16, vt16, q16, out, capacity,
                                       start, steps, context, heads, heads / kv_heads, dim,
                                       query_blocks, bf16 != 0, scale};
    if (bf16) {
        parallel(transpose_keys, &job, kv_heads * key_steps(context));
        parallel(convert_queries, &job, heads);
    }
    parallel(query_block, &job, heads * query_blocks);
}
