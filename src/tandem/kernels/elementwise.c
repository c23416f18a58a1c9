/* The per-token elementwise parts of a decoder layer, fused, for CPU steps of many tokens.
 *
 * PyTorch runs each of these as several ops over the step's tokens (dtype casts, a norm, a
 * scale; split, cat, neg, mul, add for RoPE; two index_copy_ for the cache; silu then mul),
 * each a pass over memory with its own dispatch; in bfloat16 most of them also widen and narrow
 * every element. Here each is one pass, parallel over tokens, math in float32:
 *   rmsnorm:     out = x * rsqrt(mean(x^2) + eps) * w
 *   silu_mul:    out[:, i] = silu(gu[:, i]) * gu[:, I + i]
 *   rope_store:  RoPE (rotate-half) on the q and k heads of each token's fused qkv row, in place,
 *                then k and v copied to the token's cache slot
 * In bfloat16, every value PyTorch (and HF) would round to bfloat16 is rounded at the same point
 * (RoPE: cos and sin, each product, the sum), so the fused kernels compute the same function.
 * Tensors are float32 or bfloat16 (one dtype per call, flag bf16). Built by elementwise.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dot.h"

static inline float load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int bf16, int64_t i, float f) {
    if (bf16) ((uint16_t *)p)[i] = f2bf16(f);
    else ((float *)p)[i] = f;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "avx512_math.h"
#define HAVE_VEC 1
/* 16 lanes from i, the lanes at or past n masked off (loads give 0, stores skip them). */
static inline __mmask16 tail(int64_t i, int64_t n) {
    return n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
}
static inline __m512 vload(const void *p, int bf16, int64_t i, __mmask16 m) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    const __m256i raw = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline void vstore(void *p, int bf16, int64_t i, __mmask16 m, __m512 v) {
    if (!bf16) _mm512_mask_storeu_ps((float *)p + i, m, v);
    else _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __m512 round_bf16(__m512 v) {  /* v rounded to bfloat16 and widened back */
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

static inline float rnd(float v) { return bf16f(f2bf16(v)); } /* v rounded to bfloat16 */

#define MAX_NORM_DIM 16384

void tandem_rmsnorm(const void *x, const void *w, void *out, int64_t rows, int64_t n, float eps, int bf16,
                    int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
#if defined(HAVE_VEC)
        {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i += 16) {
                const __m512 v = vload(x, bf16, r * n + i, tail(i, n));
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps));
            for (int64_t i = 0; i < n; i += 16) {
                const __mmask16 m = tail(i, n);
                __m512 v = _mm512_mul_ps(vload(x, bf16, r * n + i, m), inv);
                if (bf16) v = round_bf16(v);
                vstore(out, bf16, r * n + i, m, _mm512_mul_ps(v, vload(w, bf16, i, m)));
            }
            continue;
        }
#endif
        float ss = 0.f;
        for (int64_t i = 0; i < n; ++i) {
            const float v = load(x, bf16, r * n + i);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; ++i) {
            /* as HF: normalise in float32, round to the model dtype, then scale by the weight */
            float v = load(x, bf16, r * n + i) * inv;
            if (bf16) v = rnd(v);
            store(out, bf16, r * n + i, v * load(w, bf16, i));
        }
    }
}

void tandem_silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int bf16, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
#if defined(HAVE_VEC)
        for (int64_t i = 0; i < inter; i += 16) {
            const __mmask16 m = tail(i, inter);
            const __m512 g = vload(gu, bf16, r * 2 * inter + i, m), u = vload(gu, bf16, r * 2 * inter + inter + i, m);
            __m512 sl = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            if (bf16) sl = round_bf16(sl);
            vstore(out, bf16, r * inter + i, m, _mm512_mul_ps(sl, u));
        }
        continue;
#endif
        for (int64_t i = 0; i < inter; ++i) {
            const float g = load(gu, bf16, r * 2 * inter + i), u = load(gu, bf16, r * 2 * inter + inter + i);
            float s = g / (1.f + expf(-g));
            if (bf16) s = rnd(s);  /* torch rounds silu's output before the multiply */
            store(out, bf16, r * inter + i, s * u);
        }
    }
}

/* qkv [rows, (hq + 2 hkv) * d] (rotated in place); cos/sin float32 [rows, d];
 * caches [slots, hkv, d]; slots int64 [rows]. */
void tandem_rope_store(void *qkv, const float *cos, const float *sin, const int64_t *slots, void *k_cache,
                       void *v_cache, int64_t rows, int64_t hq, int64_t hkv, int64_t d, int bf16, int threads) {
    const int64_t width = (hq + 2 * hkv) * d, half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float *c = cos + r * d, *s = sin + r * d;
        for (int64_t head = 0; head < hq + hkv; ++head) {
            const int64_t base = r * width + head * d;
#if defined(HAVE_VEC)
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 m = tail(i, half);
                const __m512 a = vload(qkv, bf16, base + i, m), b = vload(qkv, bf16, base + i + half, m);
                __m512 c0 = _mm512_maskz_loadu_ps(m, c + i), s0 = _mm512_maskz_loadu_ps(m, s + i);
                __m512 c1 = _mm512_maskz_loadu_ps(m, c + i + half), s1 = _mm512_maskz_loadu_ps(m, s + i + half);
                if (bf16) {  /* HF: cos/sin in the model dtype, each product and the sum rounded */
                    c0 = round_bf16(c0), s0 = round_bf16(s0), c1 = round_bf16(c1), s1 = round_bf16(s1);
                    vstore(qkv, 1, base + i, m, _mm512_sub_ps(round_bf16(_mm512_mul_ps(a, c0)), round_bf16(_mm512_mul_ps(b, s0))));
                    vstore(qkv, 1, base + i + half, m, _mm512_add_ps(round_bf16(_mm512_mul_ps(b, c1)), round_bf16(_mm512_mul_ps(a, s1))));
                    continue;
                }
                vstore(qkv, bf16, base + i, m, _mm512_fmsub_ps(a, c0, _mm512_mul_ps(b, s0)));
                vstore(qkv, bf16, base + i + half, m, _mm512_fmadd_ps(b, c1, _mm512_mul_ps(a, s1)));
            }
            continue;
#endif
            for (int64_t i = 0; i < half; ++i) {
                const float a = load(qkv, bf16, base + i), b = load(qkv, bf16, base + i + half);
                if (bf16) {  /* HF: cos/sin in the model dtype, each product and the sum rounded */
                    const float c0 = rnd(c[i]), s0 = rnd(s[i]), c1 = rnd(c[i + half]), s1 = rnd(s[i + half]);
                    store(qkv, 1, base + i, rnd(a * c0) - rnd(b * s0));
                    store(qkv, 1, base + i + half, rnd(b * c1) + rnd(a * s1));
                    continue;
                }
                store(qkv, bf16, base + i, a * c[i] - b * s[i]);
                store(qkv, bf16, base + i + half, b * c[i + half] + a * s[i + half]);
            }
        }
        const int64_t elem = bf16 ? 2 : 4, kv_bytes = hkv * d * elem;
        memcpy((char *)k_cache + slots[r] * kv_bytes, (const char *)qkv + (r * width + hq * d) * elem, (size_t)kv_bytes);
        memcpy((char *)v_cache + slots[r] * kv_bytes, (const char *)qkv + (r * width + (hq + hkv) * d) * elem,
               (size_t)kv_bytes);
    }
}

/* out[r] = index of the largest of x[r, 0..n) (the first one on ties, as torch.argmax), for a
 * greedy batch's logits: PyTorch's max over dim 1 of a [64, 49152] bfloat16 tensor took ~1.6 ms
 * on 2 cores, for 6 MB of reads. NaN is never chosen (logits are finite). */
void tandem_argmax_rows(const void *x, int64_t rows, int64_t n, int bf16, int64_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t best = 0;
        float best_v = load(x, bf16, r * n);
        int64_t i = 0;
#if defined(HAVE_VEC)
        if (n >= 16) {
            /* lane j keeps the first largest of the elements j, j + 16, ... */
            __m512 vmax = vload(x, bf16, r * n, 0xFFFF);
            __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            __m512i cur = _mm512_add_epi32(vidx, _mm512_set1_epi32(16));
            for (i = 16; i + 16 <= n; i += 16) {
                const __m512 v = vload(x, bf16, r * n + i, 0xFFFF);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
                vmax = _mm512_mask_mov_ps(vmax, gt, v);
                vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
                cur = _mm512_add_epi32(cur, _mm512_set1_epi32(16));
            }
            float vals[16];
            int32_t idxs[16];
            _mm512_storeu_ps(vals, vmax);
            _mm512_storeu_si512(idxs, vidx);
            best_v = vals[0];
            best = idxs[0];
            for (int j = 1; j < 16; ++j)
                if (vals[j] > best_v || (vals[j] == best_v && idxs[j] < best)) {
                    best_v = vals[j];
                    best = idxs[j];
                }
        }
#endif
        for (; i < n; ++i) {
            const float v = load(x, bf16, r * n + i);
            if (v > best_v) {
                best_v = v;
                best = i;
            }
        }
        out[r] = best;
    }
}
