/* The whole decoder stack of a Llama-family model for a few decode rows, in one call.
 *
 * Why: at 1-2 rows a decode step streams every weight once (~10 ms for 270 MB at ~27 GB/s),
 * but PyTorch spends longer than that dispatching the ~20 small ops of each layer (norms, RoPE,
 * splits, dtype casts, residual adds). Here every layer is a fixed sequence of loops inside one
 * OpenMP parallel region, so a step costs its memory traffic plus a barrier per phase.
 *
 * Per layer, for rows r < R (x is the float32 residual stream [R, hidden]):
 *   1. xn = rmsnorm(x) * input_norm
 *   2. qkv = xn @ W_qkv^T (+ bias)                      threads split the output features
 *   3. per head: q/k rmsnorm (Qwen3), RoPE (rotate-half) on q and k; k, v stored to the cache
 *      slot slots[r] (rounded to the cache dtype)
 *   4. attention of each (row, kv head) over its blocks (paged_attention.c's item function)
 *   5. x += attn @ W_o^T
 *   6. xn = rmsnorm(x) * post_attention_norm
 *   7. act = silu(xn @ W_gate^T) * (xn @ W_up^T)         gate and up rows of one feature together
 *   8. x += act @ W_down^T
 * Math in float32; with bfloat16 weights every activation is rounded to bfloat16 where the
 * per-op path rounds it (weights and caches may be bfloat16).
 * The embedding lookup, the final norm and the LM head stay in PyTorch (decode_forward.py).
 *
 * Steps 2, 5, 7 and 8 are, with bfloat16 weights on a CPU with AMX, tile multiplies (amx_gemm.h)
 * into a float32 buffer, followed by the same rounding, bias, residual and SiLU in a pass over
 * it, for any number of rows; otherwise per-row dot products (GEMV, dot.h), which stream the
 * weights once and suit the few rows the Python side sends them. One C call thus runs a whole
 * decode step, from single-stream to batch 64 and beyond,
 * with none of the per-op dispatch of the PyTorch path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_gemm.h"
#include "dot.h"
#include "paged_attention.h"

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, attn_scale;
    int32_t bf16;     /* 1: weights, norms and caches are bfloat16; 0: float32 */
    int32_t qk_norm;  /* 1: per-head q/k rmsnorm weights are given (Qwen3) */
    /* Per layer: addresses (one int64 per layer) of the plain weights and caches. */
    const int64_t *qkv_w, *qkv_b, *o_w, *gate_up_w, *down_w, *input_norm, *post_norm, *q_norm, *k_norm;
    const int64_t *k_cache, *v_cache;
} tandem_decode_model;

/* With bfloat16 weights, activations are rounded to bfloat16 wherever the per-op path (and HF)
 * produces a bfloat16 tensor, so both compute the same function; the math between stays float32. */
static inline float rb(float v, int bf16) {
    if (!bf16) return v;
    return bf16f(f2bf16(v));
}

static inline void rmsnorm(const float *x, const void *w, int bf16, float eps, int64_t n, float *out) {
    float ss = 0.f;
#pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = rb(rb(x[i] * inv, bf16) * weight_at(w, bf16, i), bf16);
}

/* RoPE, rotate-half layout: out[d] = x[d] cos[d] - x[d + h] sin[d] (d < h), x[d] cos[d] + x[d - h] sin[d]. */
static inline void rope(float *x, const float *cos, const float *sin, int64_t d, int bf16) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float a = x[i], b = x[i + h];
        if (bf16) {  /* as HF: cos/sin in bfloat16, each product and the sum rounded */
            const float c0 = rb(cos[i], 1), s0 = rb(sin[i], 1), c1 = rb(cos[i + h], 1), s1 = rb(sin[i + h], 1);
            x[i] = rb(rb(a * c0, 1) - rb(b * s0, 1), 1);
            x[i + h] = rb(rb(b * c1, 1) + rb(a * s1, 1), 1);
        } else {
            x[i] = a * cos[i] - b * sin[i];
            x[i + h] = b * cos[i + h] + a * sin[i + h];
        }
    }
}

static inline void store_row(void *cache, int bf16, int64_t offset, const float *v, int64_t n) {
    if (bf16) {
        uint16_t *p = (uint16_t *)cache + offset;
        for (int64_t i = 0; i < n; ++i) p[i] = f2bf16(v[i]);
    } else {
        memcpy((float *)cache + offset, v, (size_t)n * sizeof(float));
    }
}

/* bfloat16 models with AVX512-BF16: the same per-row math as rmsnorm / rope / store_row and the
 * AMX path's epilogues, 16 lanes at a time (at batch 64 the scalar loops cost more than the
 * tile multiplies). Each value is rounded to bfloat16 at the same points. */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_VEC_BF16 1
#include "avx512_math.h"
static inline __m512 vrb(__m512 v) { /* v rounded to bfloat16, widened back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
static inline __m512 vbf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* n a multiple of 16 */
static inline void rmsnorm_vec(const float *x, const uint16_t *w, float eps, int64_t n, float *out) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
    const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, vrb(_mm512_mul_ps(vrb(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv)), vbf16(w + i))));
}
/* d / 2 a multiple of 16 */
static inline void rope_vec(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i += 16) {
        const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + h);
        const __m512 c0 = vrb(_mm512_loadu_ps(cos + i)), s0 = vrb(_mm512_loadu_ps(sin + i));
        const __m512 c1 = vrb(_mm512_loadu_ps(cos + i + h)), s1 = vrb(_mm512_loadu_ps(sin + i + h));
        _mm512_storeu_ps(x + i, vrb(_mm512_sub_ps(vrb(_mm512_mul_ps(a, c0)), vrb(_mm512_mul_ps(b, s0)))));
        _mm512_storeu_ps(x + i + h, vrb(_mm512_add_ps(vrb(_mm512_mul_ps(b, c1)), vrb(_mm512_mul_ps(a, s1)))));
    }
}
/* n a multiple of 16 */
static inline void store_row_vec(uint16_t *dst, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + i)));
}
#endif

/* Rows up to which steps use GEMV even where AMX is available: none. Measured on the 2-core
 * Sapphire Rapids, SmolLM2-135M bf16, context ~260: a decode step of 1 / 2 / 3 / 4 rows took
 * 9.4 / 10.7 / 9.0 / 9.4 ms with AMX tile multiplies against 12.2 / 15.9 / 15.1 / 17.6 ms with GEMV
 * (the tile loads, with the next item prefetched, stream the weights faster than the dot loops). */
#ifndef GEMV_MAX_ROWS
#define GEMV_MAX_ROWS 0
#endif

/* 1 when a call with this many rows multiplies on AMX tiles (bfloat16, AMX, tile-sized shapes). */
int tandem_decode_uses_amx(const tandem_decode_model *m, int64_t rows) {
#if defined(AMX_GEMM)
    static int permitted = -1;
    if (permitted < 0) permitted = amx_gemm_permitted();
    const int64_t H = m->hidden, qd = m->num_heads * m->head_dim, I = m->intermediate;
    const int64_t qkv_dim = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    return rows > GEMV_MAX_ROWS && m->bf16 && permitted && H % 32 == 0 && qd % 32 == 0 && I % 32 == 0
           && qkv_dim % 16 == 0;
#else
    (void)m;
    (void)rows;
    return 0;
#endif
}

/* scratch: at least R * (2 * hidden + qkv + num_heads * head_dim + intermediate) floats. */
int tandem_decode_forward(const tandem_decode_model *m, float *x, const float *cos, const float *sin,
                          const int64_t *slots, const int64_t *tables, int64_t max_blocks, const int64_t *ctx_lens,
                          int64_t rows, float *scratch, int threads) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->num_heads, Hkv = m->num_kv_heads, I = m->intermediate;
    const int64_t group = Hq / Hkv, qkv_dim = (Hq + 2 * Hkv) * D, slot_stride = Hkv * D;
    const int bf16 = m->bf16;
    float *xn = scratch, *qkv = xn + rows * H, *attn = qkv + rows * qkv_dim, *act = attn + rows * Hq * D;
    tandem_attention_item_f32 item32 = bf16 ? 0 : tandem_attention_item_for_f32(D);
    tandem_attention_item_bf16 item16 = bf16 ? tandem_attention_item_for_bf16(D) : 0;
    const int use_amx = tandem_decode_uses_amx(m, rows);
    const int rows_outer = rows >= 4 * threads;
#if defined(HAVE_VEC_BF16)
    /* vector loops for bf16 when every row length is a multiple of 16 (RoPE: half a head) */
    const int vec = bf16 && H % 16 == 0 && D % 32 == 0;
#endif
#if defined(AMX_GEMM)
    uint32_t *xp = 0;
    float *y32 = 0;
    if (use_amx) {
        const int64_t kmax = H > Hq * D ? (H > I ? H : I) : (Hq * D > I ? Hq * D : I);
        const int64_t nmax = qkv_dim > 2 * I ? (qkv_dim > H ? qkv_dim : H) : (2 * I > H ? 2 * I : H);
        xp = aligned_alloc(64, (size_t)amx_pack_bytes(rows, kmax));
        y32 = aligned_alloc(64, sizeof(float) * (size_t)(rows * nmax + 16));
        if (!xp || !y32) {
            free(xp);
            free(y32);
            return -3;
        }
    }
/* y32 [rows, N] = X [rows, K] (float32, bf16-exact, row stride K) · W^T on AMX tiles. */
#define AMX_LINEAR(X, K_, W, N_)                                                                     \
    _Pragma("omp for schedule(static)")                                                              \
    for (int64_t job = 0; job < amx_pack_jobs(rows, K_); ++job) amx_pack_job(0, X, K_, rows, K_, job, xp); \
    amx_configure();                                                                                 \
    _Pragma("omp for schedule(static)")                                                              \
    for (int64_t np = 0; np < amx_gemm_items(N_); ++np)                                               \
        amx_gemm_item(np, xp, rows, K_, (const uint16_t *)(W), N_, 0, 0, y32, N_);
#endif

#pragma omp parallel num_threads(threads)
    {
    for (int64_t layer = 0; layer < m->num_layers; ++layer) {
        const void *qkv_w = (const void *)m->qkv_w[layer], *o_w = (const void *)m->o_w[layer];
        const void *gu_w = (const void *)m->gate_up_w[layer], *down_w = (const void *)m->down_w[layer];
        const float *qkv_b = (const float *)m->qkv_b[layer];
        void *k_cache = (void *)m->k_cache[layer], *v_cache = (void *)m->v_cache[layer];
        const int64_t wsize = bf16 ? 2 : 4;

#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
#if defined(HAVE_VEC_BF16)
            if (vec) { rmsnorm_vec(x + r * H, (const uint16_t *)m->input_norm[layer], m->eps, H, xn + r * H); continue; }
#endif
            rmsnorm(x + r * H, (const void *)m->input_norm[layer], bf16, m->eps, H, xn + r * H);
        }

#if defined(AMX_GEMM)
        if (use_amx) {
            AMX_LINEAR(xn, H, qkv_w, qkv_dim)
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t o = 0; o < qkv_dim; o += 16) {
                    const __m512 b = qkv_b ? _mm512_loadu_ps(qkv_b + o) : _mm512_setzero_ps();
                    _mm512_storeu_ps(qkv + r * qkv_dim + o, vrb(_mm512_add_ps(_mm512_loadu_ps(y32 + r * qkv_dim + o), b)));
                }
        } else
#endif
        {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < qkv_dim; ++o) {
            const char *w = (const char *)qkv_w + o * H * wsize;
            const float b = qkv_b ? qkv_b[o] : 0.f;
            for (int64_t r = 0; r < rows; ++r) qkv[r * qkv_dim + o] = rb(dot_w(w, bf16, xn + r * H, H) + b, bf16);
        }
        }

#pragma omp for schedule(static)
        for (int64_t job = 0; job < rows * (Hq + 2 * Hkv); ++job) {
            const int64_t r = job / (Hq + 2 * Hkv), head = job % (Hq + 2 * Hkv);
            float *v = qkv + r * qkv_dim + head * D;
            if (head < Hq + Hkv) {  /* q or k head */
                if (m->qk_norm) {
                    float tmp[512];
                    rmsnorm(v, (const void *)(head < Hq ? m->q_norm[layer] : m->k_norm[layer]), bf16, m->eps, D, tmp);
                    memcpy(v, tmp, (size_t)D * sizeof(float));
                }
#if defined(HAVE_VEC_BF16)
                if (vec) {
                    rope_vec(v, cos + r * D, sin + r * D, D);
                    if (head >= Hq) store_row_vec((uint16_t *)k_cache + slots[r] * slot_stride + (head - Hq) * D, v, D);
                    continue;
                }
#endif
                rope(v, cos + r * D, sin + r * D, D, bf16);
                if (head >= Hq) store_row(k_cache, bf16, slots[r] * slot_stride + (head - Hq) * D, v, D);
            } else {
#if defined(HAVE_VEC_BF16)
                if (vec) {
                    store_row_vec((uint16_t *)v_cache + slots[r] * slot_stride + (head - Hq - Hkv) * D, v, D);
                    continue;
                }
#endif
                store_row(v_cache, bf16, slots[r] * slot_stride + (head - Hq - Hkv) * D, v, D);
            }
        }

        /* Items (row, kv head); with many rows a thread takes all kv heads of a row in turn (its
         * K/V rows are adjacent), as the standalone attention entry does. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < (rows_outer ? rows : rows * Hkv); ++job)
            for (int64_t kvh = rows_outer ? 0 : job % Hkv; kvh < (rows_outer ? Hkv : job % Hkv + 1); ++kvh) {
                const int64_t r = rows_outer ? job : job / Hkv;
                const float *q = qkv + r * qkv_dim + kvh * group * D;
                float *out = attn + (r * Hq + kvh * group) * D;
                if (bf16)
                    item16(q, (const uint16_t *)k_cache + kvh * D, (const uint16_t *)v_cache + kvh * D,
                           tables + r * max_blocks, ctx_lens[r], out, group, D, slot_stride, m->block_size, m->attn_scale);
                else
                    item32(q, (const float *)k_cache + kvh * D, (const float *)v_cache + kvh * D,
                           tables + r * max_blocks, ctx_lens[r], out, group, D, slot_stride, m->block_size, m->attn_scale);
            }

        if (bf16) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * Hq * D; ++i) attn[i] = rb(attn[i], 1);
        }

#if defined(AMX_GEMM)
        if (use_amx) {
            AMX_LINEAR(attn, Hq * D, o_w, H)
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * H; i += 16)
                _mm512_storeu_ps(x + i, vrb(_mm512_add_ps(_mm512_loadu_ps(x + i), vrb(_mm512_loadu_ps(y32 + i)))));
        } else
#endif
        {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < H; ++o) {
            const char *w = (const char *)o_w + o * Hq * D * wsize;
            for (int64_t r = 0; r < rows; ++r)
                x[r * H + o] = rb(x[r * H + o] + rb(dot_w(w, bf16, attn + r * Hq * D, Hq * D), bf16), bf16);
        }
        }

#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
#if defined(HAVE_VEC_BF16)
            if (vec) { rmsnorm_vec(x + r * H, (const uint16_t *)m->post_norm[layer], m->eps, H, xn + r * H); continue; }
#endif
            rmsnorm(x + r * H, (const void *)m->post_norm[layer], bf16, m->eps, H, xn + r * H);
        }

#if defined(AMX_GEMM)
        if (use_amx) {
            AMX_LINEAR(xn, H, gu_w, 2 * I)
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t o = 0; o < I; o += 16) {
                    const __m512 g = vrb(_mm512_loadu_ps(y32 + r * 2 * I + o));
                    const __m512 u = vrb(_mm512_loadu_ps(y32 + r * 2 * I + I + o));
                    const __m512 sg = vrb(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
                    _mm512_storeu_ps(act + r * I + o, vrb(_mm512_mul_ps(sg, u)));
                }
            AMX_LINEAR(act, I, down_w, H)
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * H; i += 16)
                _mm512_storeu_ps(x + i, vrb(_mm512_add_ps(_mm512_loadu_ps(x + i), vrb(_mm512_loadu_ps(y32 + i)))));
            continue;
        }
#endif
#pragma omp for schedule(static)
        for (int64_t o = 0; o < I; ++o) {
            const char *wg = (const char *)gu_w + o * H * wsize, *wu = (const char *)gu_w + (I + o) * H * wsize;
            for (int64_t r = 0; r < rows; ++r) {
                const float g = rb(dot_w(wg, bf16, xn + r * H, H), bf16), u = rb(dot_w(wu, bf16, xn + r * H, H), bf16);
                act[r * I + o] = rb(rb(g / (1.f + expf(-g)), bf16) * u, bf16);
            }
        }

#pragma omp for schedule(static)
        for (int64_t o = 0; o < H; ++o) {
            const char *w = (const char *)down_w + o * I * wsize;
            for (int64_t r = 0; r < rows; ++r)
                x[r * H + o] = rb(x[r * H + o] + rb(dot_w(w, bf16, act + r * I, I), bf16), bf16);
        }
    }
#if defined(AMX_GEMM)
    if (use_amx) _tile_release();
#endif
    }
#if defined(AMX_GEMM)
    free(xp);
    free(y32);
#endif
    return 0;
}

/* Scratch floats tandem_decode_forward needs for this many rows. */
int64_t tandem_decode_scratch_floats(const tandem_decode_model *m, int64_t rows) {
    const int64_t qkv_dim = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    return rows * (m->hidden + qkv_dim + m->num_heads * m->head_dim + m->intermediate);
}
