/* Long prefills: Q4_1 weights times activations held as 16-bit fixed point, on VNNI.
 *
 * A prefill of many positions is compute-bound. In float32 each core does one 16-lane FMA a
 * cycle at best; VPDPWSSD multiplies 32 pairs of int16 and adds them into 16 int32 lanes at
 * the same rate, so twice the products. A Q4_1 weight is fma(q, d, m) with q an integer in
 * 0..15, so over a block of 32
 *
 *     x . w = d * sum(q_i * x_i) + m * sum(x_i)
 *
 * and only sum(q_i * x_i) needs the multiplier. Each row's block of 32 activations is held as
 * a_i = round(x_i / s) with s = max|x_i| / 32767 (16-bit fixed point against the block's
 * largest), sum(q_i * a_i) is exact in int32 (|sum| <= 32 * 15 * 32767 < 2^24, so exact in
 * float32 too), and
 *
 *     x . w ~= d * s * sum(q_i * a_i) + m * sum(x_i)      (sum(x_i) in float32 from x itself)
 *
 * The only error is rounding each activation to 1/65534 of its block's largest (bfloat16
 * keeps 1/256 of each value). Its effect on the default model is measured by
 * bench/decode.py (``deviation_from_float32``) and held by tests/test_fast_path.py.
 *
 * The RMSNorm before a product (q/k/v, gate/up) and the MLP's silu(gate) * up before the down
 * product are applied to each row as it is rounded, and the residual sum after a product
 * (output, down) as its results are stored: a pass over the rows less each, and the SiLU and
 * the sum are bit for bit what the separate passes give.
 *
 * Layouts. Activations: int16 [M, K] with s and sum(x_i) per (row, block), floats [M, K/32].
 * Weights are rearranged on each call (N*K work against the product's M*N*K) into panels of
 * 16 output rows; per (panel, block): 16 vectors, lane i of vector J holding q[row i][2J] and
 * q[row i][2J + 1] as int16, then d[16] and m[16] as float32. Each output is summed by one
 * thread in a fixed order, so results do not depend on the number of threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernel_common.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))

enum { PANEL = 16 };
/* Rows a kernel call keeps in registers. */
enum { ROWS = 4 };

/* Whether this CPU runs the kernel (AVX-512 VNNI). */
int prefill_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vnni");
}

/* Vectors of weights per (panel, block): 32 weights of 16 rows as int16 pairs or u8 quads. */
static inline int block_vectors(int bits) { return bits == 16 ? 16 : 8; }
/* Bytes of one (panel, block): the weight vectors, then d[16] and m[16]. */
static inline int panel_block_bytes(int bits) { return block_vectors(bits) * 64 + 2 * PANEL * 4; }

static size_t panels_bytes(int N, int K, int bits) {
    return (size_t)((N + PANEL - 1) / PANEL) * (K / 32) * panel_block_bytes(bits);
}

/* Bytes of scratch prefill_matmul needs. */
size_t prefill_scratch_bytes(int M, int K, int N, int bits) {
    return panels_bytes(N, K, bits) + (size_t)M * K * (bits / 8) + (size_t)M * (K / 32) * 2 * 4
           + 64;
}

/* ----- activations: fixed point per block of 32 ------------------------------------------ */

typedef struct {
    const float* x;    /* [M, K], or with ``gated`` [M, 2K]: gate, then up */
    const float* norm; /* RMSNorm weights [K] to apply to each row first, or NULL */
    float eps;
    int gated;         /* the activations are silu(gate) * up */
    int M, K, rows_per_chunk, bits;
    void* a;
    float *s, *sums;
} quantize_job;

/* 1 / sqrt(mean(x^2) + eps) of a row of K (a multiple of 32) floats, in float32 as
 * LlamaRMSNorm computes it (the sum's order differs from torch's). */
VNNI static float inverse_rms(const float* x, int K, float eps) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (int k = 0; k < K; k += 32) {
        const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        s0 = _mm512_fmadd_ps(x0, x0, s0);
        s1 = _mm512_fmadd_ps(x1, x1, s1);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)K + eps);
}

VNNI static void quantize_chunk(const void* job, int c) {
    const quantize_job* j = job;
    const int blocks = j->K / 32;
    const float largest = j->bits == 16 ? 32767.0f : 127.0f;
    const int r1 = (c + 1) * j->rows_per_chunk < j->M ? (c + 1) * j->rows_per_chunk : j->M;
    for (int r = c * j->rows_per_chunk; r < r1; r++) {
        /* With a norm, each value is w * (x * inverse rms), as LlamaRMSNorm rounds it. */
        const __m512 inv_rms = _mm512_set1_ps(j->norm ? inverse_rms(j->x + (size_t)r * j->K, j->K, j->eps) : 1.0f);
        for (int b = 0; b < blocks; b++) {
            const size_t at = (size_t)r * j->K + b * 32; /* in the activations */
            const float* row = j->x + (size_t)r * j->K * (j->gated ? 2 : 1) + b * 32;
            __m512 x0 = _mm512_loadu_ps(row), x1 = _mm512_loadu_ps(row + 16);
            if (j->gated) { /* as silu_times computes them */
                x0 = silu_times16(x0, _mm512_loadu_ps(row + j->K));
                x1 = silu_times16(x1, _mm512_loadu_ps(row + j->K + 16));
            }
            if (j->norm) {
                x0 = _mm512_mul_ps(_mm512_loadu_ps(j->norm + b * 32), _mm512_mul_ps(x0, inv_rms));
                x1 = _mm512_mul_ps(_mm512_loadu_ps(j->norm + b * 32 + 16), _mm512_mul_ps(x1, inv_rms));
            }
            const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const __m512 inv = _mm512_set1_ps(top > 0.0f ? largest / top : 0.0f);
            /* |x * inv| <= largest (+ a rounding), so the conversion stays in range. */
            const __m512i a0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
            const __m512i a1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
            if (j->bits == 16) {
                int16_t* a = (int16_t*)j->a + at;
                _mm256_storeu_si256((__m256i*)a, _mm512_cvtsepi32_epi16(a0));
                _mm256_storeu_si256((__m256i*)(a + 16), _mm512_cvtsepi32_epi16(a1));
            } else {
                int8_t* a = (int8_t*)j->a + at;
                _mm_storeu_si128((__m128i*)a, _mm512_cvtsepi32_epi8(a0));
                _mm_storeu_si128((__m128i*)(a + 16), _mm512_cvtsepi32_epi8(a1));
            }
            j->s[(size_t)r * blocks + b] = top / largest;
            j->sums[(size_t)r * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
        }
    }
}

/* ----- weights: Q4_1 rows into panels of 16 ----------------------------------------------- */

typedef struct {
    const uint8_t* q;
    const uint16_t* s;
    int N, K, bits;
    uint8_t* panels;
} panels_job;

VNNI static void panels_chunk(const void* job, int p) {
    const panels_job* j = job;
    const int blocks = j->K / 32, vectors = block_vectors(j->bits);
    for (int b = 0; b < blocks; b++) {
        uint8_t* out = j->panels + ((size_t)p * blocks + b) * panel_block_bytes(j->bits);
        uint32_t* words = (uint32_t*)out; /* [J][lane]: a pair or a quad of weights */
        float* d = (float*)(out + vectors * 64);
        float* m = d + PANEL;
        for (int i = 0; i < PANEL; i++) {
            const int n = p * PANEL + i;
            if (n >= j->N) { /* padding rows: zero weights, so zero outputs (not stored) */
                for (int J = 0; J < vectors; J++) words[J * PANEL + i] = 0;
                d[i] = m[i] = 0.0f;
                continue;
            }
            /* Byte t holds weight t (low nibble) and weight t + 16 (high nibble). */
            const __m128i bytes = _mm_loadu_si128((const __m128i*)(j->q + (size_t)n * (j->K / 2) + b * 16));
            const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
            const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
            uint32_t row[16]; /* weights 0..31 in order, as int16 or as bytes */
            if (j->bits == 16) {
                _mm256_storeu_si256((__m256i*)row, _mm256_cvtepu8_epi16(low));
                _mm256_storeu_si256((__m256i*)(row + 8), _mm256_cvtepu8_epi16(high));
            } else {
                _mm_storeu_si128((__m128i*)row, low);
                _mm_storeu_si128((__m128i*)(row + 4), high);
            }
            for (int J = 0; J < vectors; J++) words[J * PANEL + i] = row[J];
            const uint16_t* scales = j->s + (size_t)n * (j->K / 16) + 2 * b;
            d[i] = _cvtsh_ss(scales[0]);
            m[i] = _cvtsh_ss(scales[1]);
        }
    }
}

/* ----- the product ------------------------------------------------------------------------- */

/* acc + the products of w's lanes with the activations at ``word`` (one 32-bit word, the
 * same for all lanes), summed a lane at a time: int16 pairs (VPDPWSSD) or u8 weights times
 * int8 quads (VPDPBUSD). The word is broadcast inside the instruction ({1to16}): GCC emits a
 * separate broadcast for _mm512_set1_epi32, one more instruction per product vector. */
VNNI static inline __attribute__((always_inline)) __m512i dot_word(__m512i acc, __m512i w,
                                                                   const int32_t* word,
                                                                   const int BITS) {
    if (BITS == 16)
        __asm__("vpdpwssd %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*word), "v"(w));
    else
        __asm__("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*word), "v"(w));
    return acc;
}

/* Row r's activations of block b, as 32-bit words (int16 pairs or int8 quads). */
#define ROW_WORDS(r) ((const int32_t*)((const uint8_t*)a + ((size_t)row[r] * K + b * 32) * (BITS / 8)))
/* Row r's block b: its products, rescaled, into f (d * s * sum(q * a)) and g (m * sum(x)). */
#define ROW_SCALE(r)                                                                          \
    f##r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e##r),                                          \
                           _mm512_mul_ps(d, _mm512_set1_ps(s[(size_t)row[r] * blocks + b])), f##r); \
    g##r = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[(size_t)row[r] * blocks + b]), g##r);

/* y[r, 0:cols] for R (1..4) rows of BITS-bit activations against one panel; BITS is a
 * constant where inlined. Four rows always run (rows past R repeat row R - 1, not stored):
 * one kernel, and each row's sums the same whatever rows run beside it. Each accumulator is
 * a named variable: in arrays GCC spilled some to the stack every block (5-12% slower). */
VNNI static inline __attribute__((always_inline)) void panel_rows(
    const void* a, const float* s, const float* sums, const int R, const int BITS, int K,
    const uint8_t* panel, const float* residual, float* y, int ldy, int cols) {
    const int blocks = K / 32, vectors = block_vectors(BITS), bytes = panel_block_bytes(BITS);
    const int row[4] = {0, R > 1 ? 1 : 0, R > 2 ? 2 : R - 1, R > 3 ? 3 : R - 1};
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, g0 = f0, g1 = f0, g2 = f0, g3 = f0;
    for (int b = 0; b < blocks; b++) {
        const __m512i* w = (const __m512i*)(panel + (size_t)b * bytes);
        const int32_t *a0 = ROW_WORDS(0), *a1 = ROW_WORDS(1), *a2 = ROW_WORDS(2), *a3 = ROW_WORDS(3);
        __m512i e0 = _mm512_setzero_si512(), e1 = e0, e2 = e0, e3 = e0;
        for (int J = 0; J < vectors; J++) {
            const __m512i wj = _mm512_loadu_si512(w + J);
            e0 = dot_word(e0, wj, a0 + J, BITS);
            e1 = dot_word(e1, wj, a1 + J, BITS);
            e2 = dot_word(e2, wj, a2 + J, BITS);
            e3 = dot_word(e3, wj, a3 + J, BITS);
        }
        const float* dm = (const float*)(w + vectors);
        const __m512 d = _mm512_loadu_ps(dm), m = _mm512_loadu_ps(dm + PANEL);
        ROW_SCALE(0) ROW_SCALE(1) ROW_SCALE(2) ROW_SCALE(3)
    }
    const __mmask16 keep = cols >= PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    const __m512 out[4] = {_mm512_add_ps(f0, g0), _mm512_add_ps(f1, g1), _mm512_add_ps(f2, g2),
                           _mm512_add_ps(f3, g3)};
    for (int r = 0; r < R; r++) /* + the residual: what adding it after the product gives */
        _mm512_mask_storeu_ps(y + (size_t)r * ldy, keep, residual == NULL ? out[r] : _mm512_add_ps(
            _mm512_maskz_loadu_ps(keep, residual + (size_t)r * ldy), out[r]));
}

/* panel_rows with BITS (16 or 8) made a constant. */
VNNI static void panel_rows_any(const void* a, const float* s, const float* sums, int rows,
                                int bits, int K, const uint8_t* panel, const float* residual,
                                float* y, int ldy, int cols) {
    if (bits == 16)
        panel_rows(a, s, sums, rows, 16, K, panel, residual, y, ldy, cols);
    else
        panel_rows(a, s, sums, rows, 8, K, panel, residual, y, ldy, cols);
}

typedef struct {
    const uint8_t* a;
    const float *s, *sums;
    int M, K, N, rows_per_chunk, bits;
    const uint8_t* panels;
    const float* residual; /* [M, N] added to the products, or NULL */
    float* y;
} product_job;

/* Chunk c: rows [c * rows_per_chunk, ...) against every panel, ROWS rows at a time (a panel
 * is read from cache once per ROWS rows; the chunk's rows stay in L2 across panels). */
VNNI static void product_chunk(const void* job, int c) {
    const product_job* j = job;
    const int blocks = j->K / 32, panels = (j->N + PANEL - 1) / PANEL;
    const int r0 = c * j->rows_per_chunk;
    const int r1 = r0 + j->rows_per_chunk < j->M ? r0 + j->rows_per_chunk : j->M;
    for (int p = 0; p < panels; p++) {
        const uint8_t* panel = j->panels + (size_t)p * blocks * panel_block_bytes(j->bits);
        const int cols = j->N - p * PANEL < PANEL ? j->N - p * PANEL : PANEL;
        for (int r = r0; r < r1; r += ROWS)
            panel_rows_any(j->a + (size_t)r * j->K * (j->bits / 8), j->s + (size_t)r * blocks,
                           j->sums + (size_t)r * blocks, r1 - r < ROWS ? r1 - r : ROWS, j->bits,
                           j->K, panel,
                           j->residual ? j->residual + (size_t)r * j->N + p * PANEL : NULL,
                           j->y + (size_t)r * j->N + p * PANEL, j->N, cols);
    }
}

/* y[M, N] ~= residual + norm(x[M, K]) @ W[N, K]^T for Q4_1 W (quants q, scales s as
 * packed_kernel.c lays them out), norm(x) rounded to ``bits`` (16 or 8) bit fixed point per
 * block of 32 as above. ``norm``: RMSNorm weights [K] (with ``eps``) or NULL for x itself;
 * ``gated``: x is [M, 2K], gate then up, and the activations silu(gate) * up (as silu_times
 * gives them); ``residual``: [M, N] or NULL for none. Each saves a pass over the rows, and
 * the residual's sum is the one adding it after the product gives. ``scratch`` holds
 * prefill_scratch_bytes(M, K, N, bits) bytes. K must be a multiple of 32. */
void prefill_matmul(const float* x, int M, int K, const uint8_t* q, const uint16_t* s, int N,
                    float* y, void* scratch, int bits, const float* norm, float eps,
                    int gated, const float* residual) {
    const int blocks = K / 32, threads = pool_size();
    uint8_t* panels = (uint8_t*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    uint8_t* a = panels + panels_bytes(N, K, bits);
    float* scale = (float*)(a + (size_t)M * K * (bits / 8));
    float* sums = scale + (size_t)M * blocks;

    const panels_job weights = {q, s, N, K, bits, panels};
    parallel(panels_chunk, &weights, (N + PANEL - 1) / PANEL);
    int rows = (M + 4 * threads - 1) / (4 * threads);
    const quantize_job activations = {x, norm, eps, gated, M, K, rows, bits, a, scale, sums};
    parallel(quantize_chunk, &activations, (M + rows - 1) / rows);
    /* About four chunks a thread, whole multiples of ROWS rows. */
    rows = (rows + ROWS - 1) / ROWS * ROWS;
    const product_job product = {a, scale, sums, M, K, N, rows, bits, panels, residual, y};
    parallel(product_chunk, &product, (M + rows - 1) / rows);
}
