/* What the kernel's files share: the thread pool of packed_kernel.c and vector helpers. */
#ifndef KERNEL_COMMON_H
#define KERNEL_COMMON_H

#include <immintrin.h>

typedef void (*chunk_fn)(const void* job, int chunk);

/* Run fn(job, c) for c in [0, chunks) on the caller and whichever workers are running. */
void parallel(chunk_fn fn, const void* job, int chunks);

/* Threads taking part in a job: the caller and the active workers. */
int pool_size(void);

/* x * cos + rotate_half(x) * sin over one head of ``dim`` (at most 512), in place. */
void rope(float* x, const float* cos, const float* sin, int dim);

/* act[i] = silu(gate[i]) * up[i] for i < n. */
void silu_times(const float* gate, const float* up, int n, float* act);

/* exp(x) for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial (within
 * about 1 ulp of expf), times 2^n by scalef (which also takes care of overflow and underflow).
 * glibc's expf, one call per value, was the largest cost of attention and SiLU here. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* silu(gate) * up = gate / (1 + exp(-gate)) * up for 16 lanes, as transformers computes it. */
static inline __m512 silu_times16(__m512 gate, __m512 up) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate));
    return _mm512_mul_ps(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), up);
}

/* The lanes of a 16-lane step that lie before ``end``. */
static inline __mmask16 lanes_before(int start, int end) {
    return end - start >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - start)) - 1);
}

#endif
