/* Dot products of a weight row (float32 or bfloat16) with float32 activations, shared by the
 * GEMV kernel (gemv.c) and the fused decoder (decode_forward.c). Header-only: each library
 * inlines it. At 1-2 rows these loops stream the weights, so four independent accumulators
 * keep enough loads in flight to run near the memory bandwidth. */
#ifndef TANDEM_DOT_H
#define TANDEM_DOT_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16f(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f2bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float weight_at(const void *w, int bf16, int64_t i) {
    return bf16 ? bf16f(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* dot(w[0..n), x[0..n)) with w float32 or bfloat16. */
static inline float dot_w(const void *w, int bf16, const float *x, int64_t n) {
#if defined(__AVX512F__)
    if ((n & 63) == 0) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        if (bf16) {
            const uint16_t *p = (const uint16_t *)w;
            for (int64_t i = 0; i < n; i += 64) {
#define W16(off) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + i + off))), 16))
                a0 = _mm512_fmadd_ps(W16(0), _mm512_loadu_ps(x + i), a0);
                a1 = _mm512_fmadd_ps(W16(16), _mm512_loadu_ps(x + i + 16), a1);
                a2 = _mm512_fmadd_ps(W16(32), _mm512_loadu_ps(x + i + 32), a2);
                a3 = _mm512_fmadd_ps(W16(48), _mm512_loadu_ps(x + i + 48), a3);
#undef W16
            }
        } else {
            const float *p = (const float *)w;
            for (int64_t i = 0; i < n; i += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p + i), _mm512_loadu_ps(x + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + i + 16), _mm512_loadu_ps(x + i + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p + i + 32), _mm512_loadu_ps(x + i + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p + i + 48), _mm512_loadu_ps(x + i + 48), a3);
            }
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
#endif
    float acc = 0.f;
    if (bf16) {
        const uint16_t *p = (const uint16_t *)w;
#pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < n; ++i) acc += bf16f(p[i]) * x[i];
    } else {
        const float *p = (const float *)w;
#pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < n; ++i) acc += p[i] * x[i];
    }
    return acc;
}

#endif
