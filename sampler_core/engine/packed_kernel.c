/* Float32 arithmetic over weights kept in GGUF blocks (see packed.py for the why).
 *
 * Layout (packed.py rearranges the GGUF blocks into it once, when it builds its cache): per
 * weight matrix [N, K] two arrays, row-major by block.
 * Q4_1: quants [N, K / 2] bytes, 16 per block of 32 weights: weight j of a block is the low
 *   nibble of byte j, weight j + 16 its high nibble; scales [N, K / 32, 2] float16 (d, m).
 *   Weight = fma(q, d, m) in float32: the float32 reference weight.
 * Q8_0: quants [N, K] int8; scales [N, K / 32] float16 d. Weight = q * d, exact in float32.
 * With a row's scales side by side, they are widened to float32 sixteen at a time before the
 * row is read, instead of one conversion and broadcast per scale inside the loop.
 *
 * Every output element is summed by one thread in a fixed order, so results do not depend on
 * the number of threads.
 *
 * Threads: a decode step is ~150 small jobs (20-100 us each). A fork-join pool whose caller
 * waits at a barrier for every worker (OpenMP's) stalls for a whole scheduler time slice
 * whenever a worker is not running, which on a shared, oversubscribed machine is most of the
 * time (measured: 10x slower than one thread). Here the caller and the workers claim chunks
 * of a job from one atomic counter and the caller waits only for chunks a worker has actually
 * claimed: a worker that is not running simply takes no part.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kernel_common.h"

/* ----- the pool ------------------------------------------------------------------------- */

/* state: generation (20 bits) | chunk count (22 bits) | next chunk to claim (22 bits). */
#define NEXT_BITS 22
#define COUNT_BITS 22
#define FIELD ((1ULL << 22) - 1)
/* A worker polls for a new job this many times, yielding the CPU between polls (so on a busy
 * machine its waiting costs others nothing), before it sleeps until woken. */
#define POLLS 200

static struct {
    _Atomic uint64_t state;
    _Atomic int done;
    chunk_fn fn;
    const void* job;
    int workers;          /* started */
    _Atomic int active;   /* workers that take part (torch.get_num_threads() - 1) */
    _Atomic int sleeping;
    pthread_mutex_t lock; /* guards sleeping workers and growing the pool */
    pthread_mutex_t call; /* one job at a time */
    pthread_cond_t wake;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .call = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

/* Claim and run chunks of generation ``gen`` until none is left; false if the job changed. */
static void run_chunks(uint64_t gen) {
    uint64_t s = atomic_load(&pool.state);
    for (;;) {
        if ((s >> (NEXT_BITS + COUNT_BITS)) != gen) return;
        const uint64_t count = (s >> NEXT_BITS) & FIELD, next = s & FIELD;
        if (next >= count) return;
        if (!atomic_compare_exchange_weak(&pool.state, &s, s + 1)) continue;
        /* The job cannot finish before this chunk is marked done, so fn and job are its own. */
        pool.fn(pool.job, (int)next);
        atomic_fetch_add(&pool.done, 1);
        s = atomic_load(&pool.state);
    }
}

static void* worker(void* arg) {
    const int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.state) >> (NEXT_BITS + COUNT_BITS);
    for (;;) {
        uint64_t gen;
        for (int spin = 0;; spin++) {
            gen = atomic_load(&pool.state) >> (NEXT_BITS + COUNT_BITS);
            if (gen != seen) break;
            if (spin < POLLS) {
                if (spin < 20) _mm_pause(); else sched_yield();
                continue;
            }
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((atomic_load(&pool.state) >> (NEXT_BITS + COUNT_BITS)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
            spin = 0;
        }
        seen = gen;
        if (id < atomic_load(&pool.active)) run_chunks(gen);
    }
    return NULL;
}

/* Use ``threads - 1`` workers besides the caller (started on demand; spare ones idle). */
void pool_threads(int threads) {
    pthread_mutex_lock(&pool.lock);
    while (pool.workers < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, (void*)(intptr_t)pool.workers) != 0) break;
        pthread_detach(thread);
        pool.workers++;
    }
    atomic_store(&pool.active, threads - 1 < pool.workers ? threads - 1 : pool.workers);
    pthread_mutex_unlock(&pool.lock);
}

/* Run jobs on OpenMP's threads (torch's own runtime, loaded once per process) or, with 0, on
 * the pool's; returns whether that is how they run now (1 needs a build with OpenMP). Between
 * torch's own parallel ops, whose OpenMP threads spin for a while after each one on the cores
 * the pool's workers need (float32 prefills: oneDNN's products, then this kernel's attention),
 * the spinning threads take the work instead. Results are the same either way: chunks are
 * claimed from one counter, and each chunk computes the same whoever runs it. */
#ifdef _OPENMP
/* Whether jobs run on the OpenMP runtime's threads instead of the pool's. */
static _Atomic int on_openmp;

int pool_use_openmp(int on) {
    atomic_store(&on_openmp, on);
    return on;
}

static void parallel_openmp(chunk_fn fn, const void* job, int chunks) {
    _Atomic int next = 0;
#pragma omp parallel num_threads(atomic_load(&pool.active) + 1)
    for (int c; (c = atomic_fetch_add(&next, 1)) < chunks;) fn(job, c);
}
#else
int pool_use_openmp(int on) {
    (void)on;
    return 0; /* built without OpenMP: jobs stay on the pool */
}
#endif

void parallel(chunk_fn fn, const void* job, int chunks) {
#ifdef _OPENMP
    if (atomic_load(&on_openmp) && atomic_load(&pool.active) > 0 && chunks > 1) {
        parallel_openmp(fn, job, chunks);
        return;
    }
#endif
    if (atomic_load(&pool.active) <= 0 || chunks == 1) {
        for (int c = 0; c < chunks; c++) fn(job, c);
        return;
    }
    pthread_mutex_lock(&pool.call);
    const uint64_t gen = ((atomic_load(&pool.state) >> (NEXT_BITS + COUNT_BITS)) + 1) & 0xFFFFF;
    pool.fn = fn;
    pool.job = job;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.state, (gen << (NEXT_BITS + COUNT_BITS)) | ((uint64_t)chunks << NEXT_BITS));
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_chunks(gen);
    /* Only chunks a worker claimed are outstanding; yield while one finishes them. */
    for (int spin = 0; atomic_load(&pool.done) < chunks; spin++)
        if (spin < 20) _mm_pause(); else sched_yield();
    pthread_mutex_unlock(&pool.call);
}

int pool_size(void) { return atomic_load(&pool.active) + 1; }

enum { Q4_1 = 0, Q8_0 = 1 };

/* Rows of weights ahead of the one being read that a matrix-vector product prefetches. */
enum { PREFETCH_ROWS = 4 };

/* The 32 weights of block g of one row as two vectors of 16.
 *
 * Q4_1: a block's 32 weights take at most 16 values, fma(q, d, m) for q in 0..15, so build
 * that table once (one fma: the same rounding as the reference's, weight for weight) and look
 * each weight up by its nibble with a lane permute (which reads only the low 4 bits of each
 * index lane, so the high nibble is the same lanes shifted right by 4).
 */
static inline __attribute__((always_inline)) void block_weights(
    int kind, const uint8_t* q, const float* s, int g, __m512* w0, __m512* w1) {
    if (kind == Q4_1) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[2 * g]),
                                             _mm512_set1_ps(s[2 * g + 1]));
        const __m512i nibbles = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + 16 * g)));
        *w0 = _mm512_permutexvar_ps(nibbles, table);
        *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(nibbles, 4), table);
    } else {
        const __m512 d = _mm512_set1_ps(s[g]);
        const __m128i* b = (const __m128i*)(q + 32 * g);
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b))), d);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1))), d);
    }
}

static inline int quant_bytes(int kind, int K) { return kind == Q4_1 ? K / 2 : K; }
static inline int scale_count(int kind, int K) { return kind == Q4_1 ? K / 16 : K / 32; }

/* The largest K a row may have (its scales are widened into a buffer on the stack). */
enum { MAX_K = 16384 };

/* out[i] = h[i] widened from float16 to float32 (exact). */
static inline void widen(const uint16_t* h, int n, float* out) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(h[i]);
}

/* Memory a matrix-vector product brings into cache on the side, a few lines per row of weights:
 * the next layer's keys and values, which its attention would otherwise wait for. The products
 * are bound by arithmetic (the nibble lookups), not by the memory bus, so the bus has room.
 * Sections timed with rdtsc, with and without it alternating step by step: at 264 positions
 * attention went from ~1.1 to ~0.67 ms a step for ~0.2 ms more in the gate/up product (the
 * step -3%); at 1,000 from 2.9 to 2.3 ms (-5%); at 2,000 from 5.8 to 4.7 ms (-6.5%); at 4,000,
 * where attention reads 184 MB a step, it makes no difference (+1%, within the noise). */
enum { SIDE_RANGES = 16 };
/* At most this much of the next layer's keys and values (the first positions of each head):
 * more than the two cores' caches keep through the gate/up and down products only costs the
 * product time. */
enum { SIDE_BYTES = 768 * 1024 };
typedef struct {
    const char* start[SIDE_RANGES]; /* ranges of range_bytes each */
    int ranges;
    size_t range_bytes;
} side_region;

/* A chunk's share of a side region: ``left`` lines from byte ``offset`` of range ``range``,
 * ``per_row`` of them a row. */
typedef struct {
    const side_region* region;
    int range, per_row;
    size_t offset, left;
} side_cursor;

/* Start ``c`` at line ``line`` of ``region`` for ``lines`` lines spread over ``rows`` rows. */
static inline void side_start(side_cursor* c, const side_region* region, size_t line, size_t lines,
                              int rows) {
    *c = (side_cursor){region, (int)(line * 64 / region->range_bytes),
                       (int)(lines / (size_t)rows) + 1, line * 64 % region->range_bytes, lines};
}

/* This row's lines of the cursor's share (a prefetch never faults, and changes no result). */
static inline void side_prefetch(side_cursor* c) {
    if (c == NULL) return;
    for (int i = 0; i < c->per_row && c->left > 0 && c->range < c->region->ranges; i++, c->left--) {
        _mm_prefetch(c->region->start[c->range] + c->offset, _MM_HINT_T0);
        c->offset += 64;
        if (c->offset >= c->region->range_bytes) {
            c->offset = 0;
            c->range++;
        }
    }
}

/* y[r * ldy + n] = x[r] . W[n] for r < R and n in [n0, n1). R is a constant where inlined, so
 * the accumulators stay in registers. Each sum runs over the blocks in order, lanes apart. */
static inline __attribute__((always_inline)) void rows_times_weights(
    int kind, const float* x, const int R, int K, const uint8_t* q, const uint16_t* s, float* y,
    int ldy, int n0, int n1, side_cursor* side) {
    const int blocks = K / 32, qb = quant_bytes(kind, K), sc = scale_count(kind, K);
    float scales[MAX_K / 16];
    for (int n = n0; n < n1; n++) {
        const uint8_t* qn = q + (size_t)n * qb;
        const uint16_t* sn = s + (size_t)n * sc;
        if (n + PREFETCH_ROWS < n1) { /* the hardware prefetcher alone leaves ~20% idle here */
            for (int b = 0; b < qb; b += 64) _mm_prefetch((const char*)(qn + PREFETCH_ROWS * qb + b), _MM_HINT_T0);
            for (int b = 0; b < sc; b += 32) _mm_prefetch((const char*)(sn + PREFETCH_ROWS * sc + b), _MM_HINT_T0);
        }
        side_prefetch(side);
        widen(sn, sc, scales);
        __m512 acc[4][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int g = 0; g < blocks; g++) {
            __m512 w0, w1;
            block_weights(kind, qn, scales, g, &w0, &w1);
            for (int r = 0; r < R; r++) {
                const float* xr = x + (size_t)r * K + g * 32;
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; r++)
            y[(size_t)r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    }
}

#define ROWS_CASE(KIND, R) \
    case KIND * 8 + R: rows_times_weights(KIND, x, R, K, q, s, y, ldy, n0, n1, side); break;

/* rows_times_weights with kind and R (1..4) made constants. */
static void rows_times_block_rows(int kind, const float* x, int rows, int K, const uint8_t* q,
                                  const uint16_t* s, float* y, int ldy, int n0, int n1,
                                  side_cursor* side) {
    switch (kind * 8 + rows) {
        ROWS_CASE(Q4_1, 1) ROWS_CASE(Q4_1, 2) ROWS_CASE(Q4_1, 3) ROWS_CASE(Q4_1, 4)
        ROWS_CASE(Q8_0, 1) ROWS_CASE(Q8_0, 2) ROWS_CASE(Q8_0, 3) ROWS_CASE(Q8_0, 4)
        default: break;
    }
}

enum { CHUNK = 32 };

typedef struct {
    int kind, M, K, N, rows_per_chunk;
    const float* x;
    const uint8_t* q;
    const uint16_t* s;
    float* y;
    const side_region* side; /* or NULL */
} matmul_job;

static void matmul_chunk(const void* job, int c) {
    const matmul_job* j = job;
    const int n0 = c * j->rows_per_chunk;
    const int n1 = n0 + j->rows_per_chunk < j->N ? n0 + j->rows_per_chunk : j->N;
    side_cursor cursor, *side = NULL;
    if (j->side != NULL && j->side->ranges > 0 && j->side->range_bytes > 0) {
        /* This chunk's rows' share of the side region's lines, spread evenly over its rows. */
        const size_t lines = j->side->ranges * ((j->side->range_bytes + 63) / 64);
        const size_t first = lines * n0 / j->N, last = lines * n1 / j->N;
        side_start(&cursor, j->side, first, last - first, n1 - n0);
        side = &cursor;
    }
    for (int r = 0; r < j->M; r += 4)
        rows_times_block_rows(j->kind, j->x + (size_t)r * j->K, j->M - r < 4 ? j->M - r : 4,
                              j->K, j->q, j->s, j->y + (size_t)r * j->N, j->N, n0, n1,
                              r == 0 ? side : NULL);
}

/* packed_matmul, prefetching ``side`` (or NULL) along the way. */
static void matmul_side(int kind, const float* x, int M, int K, const uint8_t* q,
                        const uint16_t* s, int N, float* y, const side_region* side) {
    /* About four chunks a thread, in multiples of 32 rows: long contiguous runs of rows keep
     * the memory streams going (32-row chunks handed out in turn ran 1.5x slower), and a few
     * chunks per thread still let a running thread take over from one that is not. Chunks
     * that shrink towards the end (each a share of the rows left) cut the caller's wait for
     * a worker's last chunk from ~0.25 to ~0.12 ms a step, but the step ran 3-5% slower
     * (bench/sections.py): more chunk starts, and short chunks stream worse. */
    const int threads = pool_size();
    int rows = (N + 4 * threads - 1) / (4 * threads);
    rows = (rows + CHUNK - 1) / CHUNK * CHUNK;
    const matmul_job job = {kind, M, K, N, rows, x, q, s, y, side};
    parallel(matmul_chunk, &job, (N + rows - 1) / rows);
}

/* y[M, N] = x[M, K] @ W[N, K]^T with W packed as ``kind``. */
void packed_matmul(int kind, const float* x, int M, int K, const uint8_t* q, const uint16_t* s,
                   int N, float* y) {
    matmul_side(kind, x, M, K, q, s, N, y, NULL);
}

typedef struct {
    int kind, K, N;
    const uint8_t* q;
    const uint16_t* s;
    float* out;
} dequantize_job;

/* out[K] = one row of the float32 weights W stands for (row quants q, row scales s), bit for
 * bit the reference's. */
static void dequantize_row(int kind, const uint8_t* q, const uint16_t* s, int K, float* out) {
    float scales[MAX_K / 16];
    widen(s, scale_count(kind, K), scales);
    for (int g = 0; g < K / 32; g++) {
        __m512 w0, w1;
        block_weights(kind, q, scales, g, &w0, &w1);
        _mm512_storeu_ps(out + g * 32, w0);
        _mm512_storeu_ps(out + g * 32 + 16, w1);
    }
}

static void dequantize_chunk(const void* job, int c) {
    const dequantize_job* j = job;
    const int qb = quant_bytes(j->kind, j->K), sc = scale_count(j->kind, j->K);
    const int n1 = (c + 1) * CHUNK < j->N ? (c + 1) * CHUNK : j->N;
    for (int n = c * CHUNK; n < n1; n++)
        dequantize_row(j->kind, j->q + (size_t)n * qb, j->s + (size_t)n * sc, j->K,
                       j->out + (size_t)n * j->K);
}

/* out[N, K] = the float32 weights W stands for (bit for bit the reference's). */
void packed_dequantize(int kind, const uint8_t* q, const uint16_t* s, int N, int K, float* out) {
    const dequantize_job job = {kind, K, N, q, s, out};
    parallel(dequantize_chunk, &job, (N + CHUNK - 1) / CHUNK);
}

/* out[i, 0:K] = row ids[i] of the float32 weights W stands for, i < count (ids checked by the
 * caller): a tied embedding's rows for token ids, read from its blocks, so that the float32
 * table, a mapped file, is never touched (each page read maps a whole page-cache folio, up to
 * 2 MB, into the process). */
void packed_rows(int kind, const uint8_t* q, const uint16_t* s, int K, const int64_t* ids,
                 int count, float* out) {
    const int qb = quant_bytes(kind, K), sc = scale_count(kind, K);
    for (int i = 0; i < count; i++)
        dequantize_row(kind, q + (size_t)ids[i] * qb, s + (size_t)ids[i] * sc, K,
                       out + (size_t)i * K);
}

/* out = weight * (x * rsqrt(mean(x^2) + eps)), as LlamaRMSNorm in float32. */
static void rms_norm(const float* x, const float* weight, int n, float eps, float* out) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* a . b, sixteen lanes at a time. */
static inline float dot(const float* a, const float* b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* x * cos + rotate_half(x) * sin over one head. */
void rope(float* x, const float* cos, const float* sin, int dim) {
    const int half = dim / 2;
    float rotated[512]; /* packed.py hands over heads of at most MAX_HEAD_DIM = 512 */
    for (int i = 0; i < half; i++) {
        rotated[i] = -x[i + half];
        rotated[i + half] = x[i];
    }
    for (int i = 0; i < dim; i++) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

/* act[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up, as transformers computes it. */
void silu_times(const float* gate, const float* up, int n, float* act) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = lanes_before(i, n);
        _mm512_mask_storeu_ps(act + i, m, silu_times16(_mm512_maskz_loadu_ps(m, gate + i),
                                                       _mm512_maskz_loadu_ps(m, up + i)));
    }
}

/* Decode attention is split into pieces of this many positions per key-value head, so both
 * threads have work at any context length and each piece's keys and values are read from
 * memory once for all the query heads that share them (then from cache). */
enum { ATTENTION_PIECE = 128 };
/* Contexts up to MAX_PIECES * ATTENTION_PIECE positions (131,072; models here have 8,192). */
enum { MAX_PIECES = 1024 };
/* Query heads whose scores one pass over a piece's keys computes. */
enum { SCORE_HEADS = 4 };

typedef struct {
    const float *q, *keys, *values;
    float* weights; /* [heads, context]: scores, then exp(score - the piece's max) */
    float* partial; /* [pieces, heads, head_dim + 2]: sum of e * v, the piece's max, sum of e */
    int capacity, context, head_dim, heads, group, pieces;
    float scale;
} attention_job;

/* Head h's part of a piece (attention_piece) past its scores (positions t0 .. t1 - 1 of its
 * weights) and their maximum ``top``: the exponentials, their sum and the exponential-weighted
 * sum of the values ``v`` (its key-value head's). */
static void piece_values(const attention_job* j, int h, int piece, int t0, int t1,
                         const float* v, float top) {
    const int dim = j->head_dim;
    float* w = j->weights + (size_t)h * j->context;
    __m512 sums = _mm512_setzero_ps();
    for (int t = t0; t < t1; t += 16) {
        const __mmask16 m = lanes_before(t, t1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + t), _mm512_set1_ps(top)));
        sums = _mm512_mask_add_ps(sums, m, sums, e);
        _mm512_mask_storeu_ps(w + t, m, e);
    }
    float* out = j->partial + ((size_t)piece * j->heads + h) * (dim + 2);
    /* 64 dimensions at a time in registers, walking the value rows in order (a row's
     * dimensions one after another: the memory is read as it lies, which the prefetcher
     * follows; 16 dimensions a pass strided the rows and stalled on every load). Each
     * output sums even and odd positions apart, then adds the two, as before. */
    for (int i = 0; i < dim; i += 64) {
        const int n = dim - i < 64 ? (dim - i) / 16 : 4; /* vectors of this pass */
        const __mmask16 m1 = n > 1 ? 0xFFFF : 0, m2 = n > 2 ? 0xFFFF : 0, m3 = n > 3 ? 0xFFFF : 0;
        __m512 e0 = _mm512_setzero_ps(), e1 = e0, e2 = e0, e3 = e0;
        __m512 o0 = e0, o1 = e0, o2 = e0, o3 = e0;
        const float* row = v + (size_t)t0 * dim + i;
        int t = t0;
        for (; t + 2 <= t1; t += 2, row += 2 * (size_t)dim) {
            const __m512 a = _mm512_set1_ps(w[t]), b = _mm512_set1_ps(w[t + 1]);
            e0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(row), e0);
            e1 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m1, row + 16), e1);
            e2 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m2, row + 32), e2);
            e3 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m3, row + 48), e3);
            o0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(row + dim), o0);
            o1 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m1, row + dim + 16), o1);
            o2 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m2, row + dim + 32), o2);
            o3 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m3, row + dim + 48), o3);
        }
        if (t < t1) {
            const __m512 a = _mm512_set1_ps(w[t]);
            e0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(row), e0);
            e1 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m1, row + 16), e1);
            e2 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m2, row + 32), e2);
            e3 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m3, row + 48), e3);
        }
        _mm512_storeu_ps(out + i, _mm512_add_ps(e0, o0));
        _mm512_mask_storeu_ps(out + i + 16, m1, _mm512_add_ps(e1, o1));
        _mm512_mask_storeu_ps(out + i + 32, m2, _mm512_add_ps(e2, o2));
        _mm512_mask_storeu_ps(out + i + 48, m3, _mm512_add_ps(e3, o3));
    }
    out[dim] = top;
    out[dim + 1] = _mm512_reduce_add_ps(sums);
}

/* Piece c (key-value head c / pieces, positions of piece c % pieces) of every query head that
 * reads this key-value head: scores, their exponentials against the piece's maximum, and the
 * exponential-weighted sum of the values (softmax is finished in attention_combine). */
static void attention_piece(const void* job, int c) {
    const attention_job* j = job;
    const int dim = j->head_dim, kv = c / j->pieces, piece = c % j->pieces;
    const int t0 = piece * ATTENTION_PIECE;
    const int t1 = t0 + ATTENTION_PIECE < j->context ? t0 + ATTENTION_PIECE : j->context;
    const float* k = j->keys + (size_t)kv * j->capacity * dim;
    const float* v = j->values + (size_t)kv * j->capacity * dim;
    const int h0 = kv * j->group, h1 = h0 + j->group;
    float tops[SCORE_HEADS];
    for (int hb = h0; hb < h1; hb += SCORE_HEADS) {
        /* Scores of up to SCORE_HEADS query heads, each key read once for all of them (and
         * their dot products independent of each other, so they overlap). */
        const int nh = h1 - hb < SCORE_HEADS ? h1 - hb : SCORE_HEADS;
        for (int g = 0; g < nh; g++) tops[g] = -INFINITY;
        for (int t = t0; t < t1; t++) {
            const float* key = k + (size_t)t * dim;
            for (int g = 0; g < nh; g++) {
                float* w = j->weights + (size_t)(hb + g) * j->context;
                w[t] = dot(j->q + (hb + g) * dim, key, dim) * j->scale;
                tops[g] = w[t] > tops[g] ? w[t] : tops[g];
            }
        }
        for (int h = hb; h < hb + nh; h++)
            piece_values(j, h, piece, t0, t1, v, tops[h - hb]);
    }
}

/* Finish each head's softmax from its pieces: rescale every piece to the overall maximum,
 * out = sum of the pieces' weighted values / the total; the weights themselves (into ``rows``,
 * [heads, context]) only when asked for. */
static void attention_combine(const attention_job* j, float* out, float* rows) {
    const int dim = j->head_dim;
    for (int h = 0; h < j->heads; h++) {
        const float* first = j->partial + (size_t)h * (dim + 2);
        float top = -INFINITY, total = 0.0f, scale[MAX_PIECES];
        for (int p = 0; p < j->pieces; p++) {
            const float piece_top = first[(size_t)p * j->heads * (dim + 2) + dim];
            top = piece_top > top ? piece_top : top;
        }
        for (int p = 0; p < j->pieces; p++) {
            const float* part = first + (size_t)p * j->heads * (dim + 2);
            scale[p] = expf(part[dim] - top);
            total += scale[p] * part[dim + 1];
        }
        for (int i = 0; i < dim; i++) {
            float sum = 0.0f;
            for (int p = 0; p < j->pieces; p++)
                sum += scale[p] * first[(size_t)p * j->heads * (dim + 2) + i];
            out[h * dim + i] = sum / total;
        }
        if (rows == NULL) continue;
        const float* w = j->weights + (size_t)h * j->context;
        float* row = rows + (size_t)h * j->context;
        for (int p = 0; p < j->pieces; p++) {
            const int t0 = p * ATTENTION_PIECE;
            const int t1 = t0 + ATTENTION_PIECE < j->context ? t0 + ATTENTION_PIECE : j->context;
            const __m512 factor = _mm512_set1_ps(scale[p] / total);
            for (int t = t0; t < t1; t += 16) {
                const __mmask16 m = lanes_before(t, t1);
                _mm512_mask_storeu_ps(row + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + t), factor));
            }
        }
    }
}

/* A packed weight matrix: quants and scales as laid out above. */
typedef struct {
    const uint8_t* q;
    const uint16_t* s;
} packed_weight;

/* Everything a decode step reads, filled in once by packed.py (ctypes mirrors this struct). */
typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, head_kind;
    float eps, scale;
    const float* const* norm_in;    /* [layers] -> [hidden] */
    const float* const* norm_post;  /* [layers] -> [hidden] */
    const packed_weight* linears;   /* [layers][4]: qkv, o, gate_up, down (Q4_1) */
    const float* norm_final;        /* [hidden] */
    packed_weight head;             /* [vocab, hidden] as head_kind */
} packed_model;

/* One sequence of a decode step: its cache, the position it writes and what it reads there. */
typedef struct {
    float* keys;   /* the run's cache, [layers, kv_heads, capacity, head_dim] */
    float* values;
    int capacity, pos;
    const float *cos, *sin; /* the rotary rows of ``pos`` */
    float* rows;            /* [layers, heads, pos + 1] for the attention weights, or NULL */
} decode_seq;

/* Sequences one decode step runs together at most (the products keep that many rows in
 * registers, so the weights are read once for all of them). */
enum { MAX_SEQS = 4 };

/* Floats of scratch for one sequence's attention at a context of ``context`` positions. */
static size_t attention_scratch_floats(const packed_model* m, int context) {
    const int pieces = (context + ATTENTION_PIECE - 1) / ATTENTION_PIECE;
    return (size_t)m->heads * context + (size_t)pieces * m->heads * (m->head_dim + 2);
}

/* Floats of one sequence's row in each of the step's buffers (normed, q/k/v, attended,
 * gate/up, act). */
static size_t row_floats(const packed_model* m) {
    const int q_size = m->heads * m->head_dim, kv_size = m->kv_heads * m->head_dim;
    return (size_t)m->hidden + q_size + 2 * kv_size + q_size + 3 * (size_t)m->intermediate;
}

/* Floats of scratch decode_batch needs for ``count`` sequences of at most ``context``
 * positions each. */
size_t decode_batch_scratch_floats(const packed_model* m, int count, int context) {
    return (size_t)count * (row_floats(m) + attention_scratch_floats(m, context));
}

/* Floats of scratch decode_step needs for a context of ``context`` positions. */
int decode_scratch_floats(const packed_model* m, int context) {
    return (int)decode_batch_scratch_floats(m, 1, context);
}

/* One Llama layer for ``count`` sequences' new positions, in place on x [count, hidden]: see
 * decode_batch. The four products take every sequence's row at once. Inlined, so a lone
 * sequence's step (decode_step) compiles with count = 1 made a constant. */
static inline __attribute__((always_inline)) void decode_layer(
    const packed_model* m, int layer, const int count, const decode_seq* seqs, float* x,
    float* scratch, int context) {
    const int hidden = m->hidden, heads = m->heads, kv_heads = m->kv_heads;
    const int head_dim = m->head_dim, intermediate = m->intermediate;
    const int q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    const int qkv_size = q_size + 2 * kv_size;
    const packed_weight* w = m->linears + 4 * layer;
    /* Each buffer holds a row per sequence. */
    float* normed = scratch;                                 /* [count, hidden] */
    float* qkv = normed + (size_t)count * hidden;            /* [count, qkv_size] */
    float* attended = qkv + (size_t)count * qkv_size;        /* [count, q_size] */
    float* gate_up = attended + (size_t)count * q_size;      /* [count, 2 * intermediate] */
    float* act = gate_up + (size_t)count * 2 * intermediate; /* [count, intermediate] */
    float* attention = act + (size_t)count * intermediate;   /* per sequence: weights, partial */
    float* add = normed; /* o and down outputs reuse the normed buffer */

    /* Attention block: norm, q/k/v, rotary, cache write, attention (weights kept), output. */
    for (int r = 0; r < count; r++)
        rms_norm(x + (size_t)r * hidden, m->norm_in[layer], hidden, m->eps,
                 normed + (size_t)r * hidden);
    packed_matmul(Q4_1, normed, count, hidden, w[0].q, w[0].s, qkv_size, qkv);
    for (int r = 0; r < count; r++) {
        const decode_seq* seq = seqs + r;
        const int pos = seq->pos, capacity = seq->capacity;
        float* row = qkv + (size_t)r * qkv_size;
        float* keys = seq->keys + (size_t)layer * kv_heads * capacity * head_dim;
        float* values = seq->values + (size_t)layer * kv_heads * capacity * head_dim;
        for (int h = 0; h < heads + kv_heads; h++) rope(row + h * head_dim, seq->cos, seq->sin, head_dim);
        for (int h = 0; h < kv_heads; h++) {
            memcpy(keys + ((size_t)h * capacity + pos) * head_dim, row + q_size + h * head_dim,
                   head_dim * sizeof(float));
            memcpy(values + ((size_t)h * capacity + pos) * head_dim,
                   row + q_size + kv_size + h * head_dim, head_dim * sizeof(float));
        }
        float* weights = attention + (size_t)r * attention_scratch_floats(m, context);
        const int pieces = (pos + 1 + ATTENTION_PIECE - 1) / ATTENTION_PIECE;
        const attention_job job = {row, keys, values, weights, weights + (size_t)heads * (pos + 1),
                                   capacity, pos + 1, head_dim, heads, heads / kv_heads, pieces,
                                   m->scale};
        parallel(attention_piece, &job, kv_heads * pieces);
        float* rows = seq->rows == NULL ? NULL : seq->rows + (size_t)layer * heads * (pos + 1);
        attention_combine(&job, attended + (size_t)r * q_size, rows);
    }
    packed_matmul(Q4_1, attended, count, q_size, w[1].q, w[1].s, hidden, add);
    for (size_t i = 0; i < (size_t)count * hidden; i++) x[i] += add[i];

    /* MLP block: norm, gate and up, SiLU(gate) * up, down; meanwhile (during gate and up) the
     * next layer's keys and values come into cache for its attention (the first sequence's:
     * the budget is one sequence's). */
    const decode_seq* first = seqs;
    const int ahead = kv_heads < SIDE_RANGES / 2 ? kv_heads : SIDE_RANGES / 2;
    const size_t budget = SIDE_BYTES / (2 * (size_t)ahead * head_dim * sizeof(float));
    const size_t positions = (size_t)first->pos + 1 < budget ? (size_t)first->pos + 1 : budget;
    side_region next = {.ranges = 0, .range_bytes = positions * head_dim * sizeof(float)};
    for (int h = 0; layer + 1 < m->layers && h < ahead; h++) {
        const size_t at = ((size_t)(layer + 1) * kv_heads + h) * first->capacity * head_dim;
        next.start[next.ranges++] = (const char*)(first->keys + at);
        next.start[next.ranges++] = (const char*)(first->values + at);
    }
    for (int r = 0; r < count; r++)
        rms_norm(x + (size_t)r * hidden, m->norm_post[layer], hidden, m->eps,
                 normed + (size_t)r * hidden);
    matmul_side(Q4_1, normed, count, hidden, w[2].q, w[2].s, 2 * intermediate, gate_up, &next);
    for (int r = 0; r < count; r++) {
        const float* gate = gate_up + (size_t)r * 2 * intermediate;
        silu_times(gate, gate + intermediate, intermediate, act + (size_t)r * intermediate);
    }
    packed_matmul(Q4_1, act, count, intermediate, w[3].q, w[3].s, hidden, add);
    for (size_t i = 0; i < (size_t)count * hidden; i++) x[i] += add[i];
}

/* decode_batch's work, inlined there and (with count = 1, a constant) into decode_step. */
static inline __attribute__((always_inline)) void decode_seqs(
    const packed_model* m, const int count, const decode_seq* seqs, float* x, float* scratch,
    float* logits) {
    int context = 1;
    for (int r = 0; r < count; r++) context = seqs[r].pos + 1 > context ? seqs[r].pos + 1 : context;
    for (int layer = 0; layer < m->layers; layer++)
        decode_layer(m, layer, count, seqs, x, scratch, context);
    for (int r = 0; r < count; r++)
        rms_norm(x + (size_t)r * m->hidden, m->norm_final, m->hidden, m->eps,
                 scratch + (size_t)r * m->hidden);
    packed_matmul(m->head_kind, scratch, count, m->hidden, m->head.q, m->head.s, m->vocab, logits);
}

/* One decode step of the whole model for ``count`` (1..MAX_SEQS) sequences, each at its own
 * new position: x (their embeddings, [count, hidden], updated in place) through every layer,
 * the final norm and the output head into ``logits`` [count, vocab]. Each sequence writes its
 * new key and value at its ``pos`` and attends to its positions 0..pos; its ``rows`` (or NULL)
 * receives the attention weights. ``scratch`` holds decode_batch_scratch_floats(m, count, c)
 * floats, c the largest pos + 1. Every output is summed in the same order whatever ``count``
 * is, so a sequence's results do not depend on which others share its step. */
void decode_batch(const packed_model* m, int count, const decode_seq* seqs, float* x,
                  float* scratch, float* logits) {
    if (count >= 1 && count <= MAX_SEQS) decode_seqs(m, count, seqs, x, scratch, logits);
}

/* decode_batch for one sequence (see there). */
void decode_step(const packed_model* m, float* x, const float* cos, const float* sin,
                 float* keys, float* values, int capacity, int pos, float* rows, float* scratch,
                 float* logits) {
    const decode_seq seq = {keys, values, capacity, pos, cos, sin, rows};
    decode_seqs(m, 1, &seq, x, scratch, logits);
}

int decode_max_seqs(void) { return MAX_SEQS; }

/* The limits of this kernel, for packed.py to check before it hands a model over. */
int packed_max_in_features(void) { return MAX_K; }
int decode_max_context(void) { return MAX_PIECES * ATTENTION_PIECE; }
