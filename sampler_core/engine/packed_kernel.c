/* Float32 arithmetic over weights kept in GGUF blocks (see packed.py for the why).
 *
 * Q4_1 block (20 bytes): d (f16), m (f16), qs[16]; weight j = low nibble of qs[j], weight
 * j + 16 = high nibble; value fma(q, d, m), which is exactly the float32 reference weight.
 * Q8_0 block (34 bytes): d (f16), qs[32] int8; value q * d, exact in float32.
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

/* ----- the pool ------------------------------------------------------------------------- */

typedef void (*chunk_fn)(const void* job, int chunk);

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

/* Run fn(job, c) for c in [0, chunks) on the caller and whichever workers are running. */
static void parallel(chunk_fn fn, const void* job, int chunks) {
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

enum { Q4_1 = 0, Q8_0 = 1 };

static inline float f16(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* The 32 weights of one block as two vectors of 16. */
static inline void block_weights(int kind, const uint8_t* b, __m512* w0, __m512* w1) {
    const __m512 d = _mm512_set1_ps(f16(b));
    if (kind == Q4_1) {
        const __m512 m = _mm512_set1_ps(f16(b + 2));
        const __m128i raw = _mm_loadu_si128((const __m128i*)(b + 4));
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
        const __m512 q1 = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
        *w0 = _mm512_fmadd_ps(q0, d, m);
        *w1 = _mm512_fmadd_ps(q1, d, m);
    } else {
        *w0 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2)))), d);
        *w1 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18)))), d);
    }
}

/* y[r * ldy + n] = x[r] . W[n] for r < rows (at most 4) and n in [n0, n1). */
static void rows_times_block_rows(int kind, const float* x, int rows, int K, const uint8_t* w,
                                  float* y, int ldy, int n0, int n1) {
    const int blocks = K / 32, size = kind == Q4_1 ? 20 : 34;
    for (int n = n0; n < n1; n++) {
        const uint8_t* row = w + (size_t)n * blocks * size;
        __m512 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int g = 0; g < blocks; g++) {
            __m512 w0, w1;
            block_weights(kind, row + g * size, &w0, &w1);
            for (int r = 0; r < rows; r++) {
                const float* xr = x + (size_t)r * K + g * 32;
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++)
            y[(size_t)r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    }
}

enum { CHUNK = 32 };

typedef struct {
    int kind, M, K, N;
    const float* x;
    const uint8_t* w;
    float* y;
} matmul_job;

static void matmul_chunk(const void* job, int c) {
    const matmul_job* j = job;
    const int n0 = c * CHUNK, n1 = n0 + CHUNK < j->N ? n0 + CHUNK : j->N;
    for (int r = 0; r < j->M; r += 4)
        rows_times_block_rows(j->kind, j->x + (size_t)r * j->K, j->M - r < 4 ? j->M - r : 4,
                              j->K, j->w, j->y + (size_t)r * j->N, j->N, n0, n1);
}

/* y[M, N] = x[M, K] @ W[N, K]^T with W packed as ``kind``. */
void packed_matmul(int kind, const float* x, int M, int K, const uint8_t* w, int N, float* y) {
    const matmul_job job = {kind, M, K, N, x, w, y};
    parallel(matmul_chunk, &job, (N + CHUNK - 1) / CHUNK);
}

typedef struct {
    int kind, K, N;
    const uint8_t* w;
    float* out;
} dequantize_job;

static void dequantize_chunk(const void* job, int c) {
    const dequantize_job* j = job;
    const int blocks = j->K / 32, size = j->kind == Q4_1 ? 20 : 34;
    const int n1 = (c + 1) * CHUNK < j->N ? (c + 1) * CHUNK : j->N;
    for (int n = c * CHUNK; n < n1; n++)
        for (int g = 0; g < blocks; g++) {
            __m512 w0, w1;
            block_weights(j->kind, j->w + ((size_t)n * blocks + g) * size, &w0, &w1);
            _mm512_storeu_ps(j->out + (size_t)n * j->K + g * 32, w0);
            _mm512_storeu_ps(j->out + (size_t)n * j->K + g * 32 + 16, w1);
        }
}

/* out[N, K] = the float32 weights W stands for (bit for bit the reference's). */
void packed_dequantize(int kind, const uint8_t* w, int N, int K, float* out) {
    const dequantize_job job = {kind, K, N, w, out};
    parallel(dequantize_chunk, &job, (N + CHUNK - 1) / CHUNK);
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

/* out = weight * (x * rsqrt(mean(x^2) + eps)), as LlamaRMSNorm in float32. */
static void rms_norm(const float* x, const float* weight, int n, float eps, float* out) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* x * cos + rotate_half(x) * sin over one head. */
static void rope(float* x, const float* cos, const float* sin, int dim) {
    const int half = dim / 2;
    float rotated[512];
    for (int i = 0; i < half; i++) {
        rotated[i] = -x[i + half];
        rotated[i + half] = x[i];
    }
    for (int i = 0; i < dim; i++) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

typedef struct {
    const float *q, *keys, *values;
    float *weights, *out, *rows;
    int capacity, context, head_dim, group;
    float scale;
} attention_job;

/* One head's attention row: softmax(q . K^T * scale), then its weighted sum of V. */
static void attention_head(const void* job, int h) {
    const attention_job* j = job;
    const int dim = j->head_dim, context = j->context;
    const float* q = j->q + h * dim;
    const float* k = j->keys + (size_t)(h / j->group) * j->capacity * dim;
    const float* v = j->values + (size_t)(h / j->group) * j->capacity * dim;
    float* w = j->weights + (size_t)h * context;
    float top = -INFINITY;
    for (int t = 0; t < context; t++) {
        w[t] = dot(q, k + (size_t)t * dim, dim) * j->scale;
        top = w[t] > top ? w[t] : top;
    }
    float total = 0.0f;
    for (int t = 0; t < context; t++) {
        w[t] = expf(w[t] - top);
        total += w[t];
    }
    for (int t = 0; t < context; t++) w[t] = w[t] / total;
    float* out = j->out + h * dim;
    for (int i = 0; i < dim; i++) out[i] = 0.0f;
    for (int t = 0; t < context; t++)
        for (int i = 0; i < dim; i++) out[i] += w[t] * v[(size_t)t * dim + i];
    if (j->rows != NULL) memcpy(j->rows + (size_t)h * context, w, context * sizeof(float));
}

/* One decode step of one Llama layer for one new position ``pos``, in place on ``x``.
 *
 * keys/values: this layer's cache, [kv_heads, capacity, head_dim]; the new key and value are
 * written at ``pos`` and the query attends to positions 0..pos. ``rows`` (or NULL) receives
 * the attention weights, [heads, pos + 1]. ``scratch`` holds at least
 * hidden + (heads + 2 kv_heads) head_dim + hidden + 3 intermediate + heads (pos + 1) floats.
 */
void decode_layer(float* x, int hidden, int heads, int kv_heads, int head_dim, int intermediate,
                  float eps, float scale, const float* w_in, const float* w_post,
                  const uint8_t* w_qkv, const uint8_t* w_o, const uint8_t* w_gate_up,
                  const uint8_t* w_down, const float* cos, const float* sin, float* keys,
                  float* values, int capacity, int pos, float* rows, float* scratch) {
    const int q_size = heads * head_dim, kv_size = kv_heads * head_dim, group = heads / kv_heads;
    const int context = pos + 1;
    float* normed = scratch;
    float* qkv = normed + hidden;
    float* attended = qkv + q_size + 2 * kv_size;
    float* gate_up = attended + q_size;
    float* act = gate_up + 2 * intermediate;
    float* weights = act + intermediate;
    float* add = normed; /* o and down outputs reuse the normed buffer */

    /* Attention block. */
    rms_norm(x, w_in, hidden, eps, normed);
    packed_matmul(Q4_1, normed, 1, hidden, w_qkv, q_size + 2 * kv_size, qkv);
    for (int h = 0; h < heads + kv_heads; h++) rope(qkv + h * head_dim, cos, sin, head_dim);
    for (int h = 0; h < kv_heads; h++) {
        memcpy(keys + ((size_t)h * capacity + pos) * head_dim, qkv + q_size + h * head_dim,
               head_dim * sizeof(float));
        memcpy(values + ((size_t)h * capacity + pos) * head_dim,
               qkv + q_size + kv_size + h * head_dim, head_dim * sizeof(float));
    }
    const attention_job job = {qkv, keys, values, weights, attended, rows, capacity, context,
                               head_dim, heads / kv_heads, scale};
    parallel(attention_head, &job, heads);
    packed_matmul(Q4_1, attended, 1, q_size, w_o, hidden, add);
    for (int i = 0; i < hidden; i++) x[i] += add[i];

    /* MLP block. */
    rms_norm(x, w_post, hidden, eps, normed);
    packed_matmul(Q4_1, normed, 1, hidden, w_gate_up, 2 * intermediate, gate_up);
    for (int i = 0; i < intermediate; i++) {
        const float g = gate_up[i];
        act[i] = g / (1.0f + expf(-g)) * gate_up[intermediate + i];
    }
    packed_matmul(Q4_1, act, 1, intermediate, w_down, hidden, add);
    for (int i = 0; i < hidden; i++) x[i] += add[i];
}

int packed_version(void) { return 3; }
