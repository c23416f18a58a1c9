/* Prefill attention over the paged KV cache with AMX tiles (bfloat16, CPU).
 *
 * A prefill chunk of n query tokens is the last n positions of a sequence of ctx tokens whose
 * K/V (the chunk's own included: the caller stored them first) live in the paged caches
 * [num_slots, num_kv_heads, head_dim] through the sequence's block table. Query i sees keys
 * 0 .. ctx - n + i (causal, aligned bottom-right), so a chunk with a cached prefix reads that
 * prefix in place: no gather, no mask tensor.
 *
 * PyTorch's CPU flash attention reaches ~0.3-0.5 TFLOP/s here; AMX's tile multiply (16x16
 * float32 += 16x32 bf16 · 32x16 bf16 per instruction) is an order of magnitude faster than that,
 * and no library offers paged prefill attention on CPU, so the kernel is ours.
 *
 * Two phases, both parallel over OpenMP threads:
 *  1. pack, per (chunk, kv head, 32 keys): K transposed into the tile layout AMX wants for the
 *     right operand of Q·K^T (pairs of adjacent head dims in one 32-bit lane, keys as columns)
 *     and V interleaved by pairs of keys for the right operand of P·V. Keys past ctx are zero.
 *  2. attention, per (chunk, query head, tile of 16 queries), exact softmax in two passes
 *     (no online rescaling): S = Q·K^T over every visible key into a float32 row buffer
 *     (tiles of 16 queries x 32 keys), then per query row max, exp, sum, with the
 *     probabilities rounded to bf16 (as FlashAttention does), then O = P·V accumulated in
 *     tiles of 16 queries x 16 head dims, and out = O / sum rounded to bf16.
 * The row buffer holds 16 x ctx floats, so the context of one call is limited by memory only.
 *
 * Built with -march=native; without AMX the entry returns -2 and the caller keeps SDPA.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_gemm.h" /* tile configuration and the AMX permission */

#if defined(AMX_GEMM)
#define HAVE_AMX 1
#endif

#define MAX_HEAD_DIM 256
#define NEG_BIG (-1e30f)

#if defined(HAVE_AMX)
/* Tiles (all 16 rows x 64 bytes, amx_configure): 0 = left operand, 1-3 = right operands, 4-7 = results. */

/* 16 keys of one kv head (rows of 32 head dims starting at dim 32*dc) as the right operand of
 * Q·K^T: dword (i, n) = key n's dims 2i and 2i+1. */
static void pack_k_tile(uint32_t *dst, const uint16_t *const rows[16], int64_t dc) {
    for (int n = 0; n < 16; ++n) {
        if (!rows[n]) {
            for (int i = 0; i < 16; ++i) dst[i * 16 + n] = 0;
            continue;
        }
        const uint32_t *src = (const uint32_t *)(rows[n] + 32 * dc);
        for (int i = 0; i < 16; ++i) dst[i * 16 + n] = src[i];
    }
}

/* 32 keys (pairs 2i, 2i+1) x 16 head dims from dim 16*dt as the right operand of P·V:
 * dword (i, j) = (V[2i][j], V[2i+1][j]). */
static void pack_v_tile(uint32_t *dst, const uint16_t *const rows[32], int64_t dt) {
    for (int i = 0; i < 16; ++i) {
        const __m512i lo = rows[2 * i] ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rows[2 * i] + 16 * dt)))
                                       : _mm512_setzero_si512();
        const __m512i hi = rows[2 * i + 1]
                               ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rows[2 * i + 1] + 16 * dt)))
                               : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + i * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

static inline __mmask16 tail_mask(int64_t i, int64_t n) {
    return n - i >= 16 ? (__mmask16)0xFFFF : n - i <= 0 ? (__mmask16)0 : (__mmask16)((1u << (n - i)) - 1);
}

/* 2^x for x <= 0 (softmax arguments): 2^round(x) times a degree-4 Taylor polynomial of 2^f,
 * |f| <= 1/2 (relative error < 5e-5, far below the bf16 rounding of the probabilities);
 * very negative x gives 0 through vscalefps. */
static inline __m512 exp2_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* One query row: probabilities exp(scale (s - max)) of its first vis scores, rounded to bf16
 * into prow (zero up to width, a multiple of 16); returns 1 / their sum. */
static inline float softmax_row(const float *srow, uint16_t *prow, int64_t vis, int64_t width, float scale) {
    const int64_t whole = vis / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (vis - whole)) - 1);
    /* Four running maxima: one chain would wait on the max's latency every vector. */
    __m512 mx[4] = {_mm512_mask_loadu_ps(_mm512_set1_ps(NEG_BIG), tail, srow + whole), _mm512_set1_ps(NEG_BIG),
                    _mm512_set1_ps(NEG_BIG), _mm512_set1_ps(NEG_BIG)};
    int64_t j = 0;
    for (; j + 64 <= whole; j += 64)
        for (int u = 0; u < 4; ++u) mx[u] = _mm512_max_ps(mx[u], _mm512_loadu_ps(srow + j + 16 * u));
    for (; j < whole; j += 16) mx[0] = _mm512_max_ps(mx[0], _mm512_loadu_ps(srow + j));
    const __m512 vmax = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
    const float c = scale * 1.44269504089f;  /* exp(scale s) = 2^(c s) */
    const __m512 vc = _mm512_set1_ps(c), vshift = _mm512_set1_ps(-c * _mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps(), vsum2 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= whole; i += 32) {
        const __m512 p = exp2_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(srow + i), vc, vshift));
        const __m512 p2 = exp2_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(srow + i + 16), vc, vshift));
        vsum = _mm512_add_ps(vsum, p);
        vsum2 = _mm512_add_ps(vsum2, p2);
        _mm512_storeu_si512(prow + i, (__m512i)_mm512_cvtne2ps_pbh(p2, p));
    }
    for (; i < whole; i += 16) {
        const __m512 p = exp2_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(srow + i), vc, vshift));
        vsum = _mm512_add_ps(vsum, p);
        _mm256_storeu_si256((__m256i *)(prow + i), (__m256i)_mm512_cvtneps_pbh(p));
    }
    vsum = _mm512_add_ps(vsum, vsum2);
    if (tail) {
        const __m512 p = _mm512_maskz_mov_ps(
            tail, exp2_nonpositive(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, srow + i), vc, vshift)));
        vsum = _mm512_add_ps(vsum, p);
        _mm256_storeu_si256((__m256i *)(prow + i), (__m256i)_mm512_cvtneps_pbh(p));
        i += 16;
    }
    for (; i < width; i += 16) _mm256_storeu_si256((__m256i *)(prow + i), _mm256_setzero_si256());
    return 1.f / _mm512_reduce_add_ps(vsum);
}
#endif

/* 1 when this build and CPU can run the kernel (AMX compiled in and the OS grants tile state). */
int tandem_prefill_attention_available(void) {
#if defined(HAVE_AMX)
    return amx_gemm_permitted();
#else
    return 0;
#endif
}

/* q [tokens, q_stride] bf16 (head h of token t at q + t*q_stride + h*head_dim), out likewise with
 * out_stride; tables [chunks, max_blocks]; info [chunks, 3] = (first token, queries, ctx).
 * Returns 0, -1 for a shape outside the limits, -2 without AMX, -3 out of memory. */
int tandem_prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                                  const uint16_t *v_cache, const int64_t *tables, int64_t max_blocks,
                                  const int64_t *info, int64_t chunks, uint16_t *out, int64_t out_stride,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                  float scale, int threads) {
#if !defined(HAVE_AMX)
    (void)q; (void)q_stride; (void)k_cache; (void)v_cache; (void)tables; (void)max_blocks; (void)info;
    (void)chunks; (void)out; (void)out_stride; (void)num_heads; (void)num_kv_heads; (void)head_dim;
    (void)block_size; (void)scale; (void)threads;
    return -2;
#else
    const int64_t D = head_dim;
    if (D % 32 != 0 || D > MAX_HEAD_DIM || num_heads % num_kv_heads != 0 || chunks <= 0) return -1;
    const int64_t group = num_heads / num_kv_heads, slot_stride = num_kv_heads * D;
    const int64_t dchunks = D / 32, dtiles = D / 16;
    /* Pack buffers: per (chunk, kv head) ctx_pad * D bf16 for K and as much for V. */
    int64_t *pack_off = malloc(sizeof(int64_t) * (size_t)(chunks + 1));
    int64_t *item_off = malloc(sizeof(int64_t) * (size_t)(chunks + 1));
    int64_t *pair_off = malloc(sizeof(int64_t) * (size_t)(chunks + 1));
    if (!pack_off || !item_off || !pair_off) { free(pack_off); free(item_off); free(pair_off); return -3; }
    int64_t max_ctx_pad = 32;
    pack_off[0] = item_off[0] = pair_off[0] = 0;
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n = info[3 * c + 1], ctx = info[3 * c + 2];
        if (n < 1 || ctx < n || (ctx + block_size - 1) / block_size > max_blocks) {
            free(pack_off); free(item_off); free(pair_off);
            return -1;
        }
        const int64_t ctx_pad = (ctx + 31) / 32 * 32;
        if (ctx_pad > max_ctx_pad) max_ctx_pad = ctx_pad;
        pack_off[c + 1] = pack_off[c] + num_kv_heads * ctx_pad * D / 2;  /* dwords */
        item_off[c + 1] = item_off[c] + num_kv_heads * ((n + 15) / 16);
        pair_off[c + 1] = pair_off[c] + num_kv_heads * (ctx_pad / 32);
    }
    uint32_t *kpack = aligned_alloc(64, (size_t)pack_off[chunks] * 4 + 64);
    uint32_t *vpack = aligned_alloc(64, (size_t)pack_off[chunks] * 4 + 64);
    if (!kpack || !vpack) {
        free(kpack); free(vpack); free(pack_off); free(item_off); free(pair_off);
        return -3;
    }
    int failed = 0;

#pragma omp parallel num_threads(threads)
    {
        amx_configure();
        /* Phase 1: pack K and V, 32 keys of one (chunk, kv head) per work item. */
#pragma omp for schedule(dynamic, 4)
        for (int64_t w = 0; w < pair_off[chunks]; ++w) {
            int64_t c = 0;
            while (pair_off[c + 1] <= w) ++c;
            const int64_t ctx = info[3 * c + 2], ctx_pad = (ctx + 31) / 32 * 32;
            const int64_t kvh = (w - pair_off[c]) / (ctx_pad / 32), kp = (w - pair_off[c]) % (ctx_pad / 32);
            const int64_t *table = tables + c * max_blocks;
            const uint16_t *krows[32], *vrows[32];
            for (int u = 0; u < 32; ++u) {
                const int64_t t = 32 * kp + u;
                if (t < ctx) {
                    const int64_t slot = table[t / block_size] * block_size + t % block_size;
                    krows[u] = k_cache + slot * slot_stride + kvh * D;
                    vrows[u] = v_cache + slot * slot_stride + kvh * D;
                } else {
                    krows[u] = vrows[u] = 0;
                }
            }
            uint32_t *kbase = kpack + pack_off[c] + kvh * ctx_pad * D / 2;
            uint32_t *vbase = vpack + pack_off[c] + kvh * ctx_pad * D / 2;
            /* K tile (key tile kt, dim chunk dc) at (kt * dchunks + dc) * 256 dwords. */
            for (int half = 0; half < 2; ++half)
                for (int64_t dc = 0; dc < dchunks; ++dc)
                    pack_k_tile(kbase + ((2 * kp + half) * dchunks + dc) * 256, krows + 16 * half, dc);
            /* V tile (key pair tile kp, dim tile dt) at (kp * dtiles + dt) * 256 dwords. */
            for (int64_t dt = 0; dt < dtiles; ++dt) pack_v_tile(vbase + (kp * dtiles + dt) * 256, vrows, dt);
        }

        /* Phase 2: attention per (chunk, 16 queries, kv head), the group's query heads in turn
         * (they share the packed K/V, warm in cache); the last (longest) query tiles first. */
        float *scores = aligned_alloc(64, sizeof(float) * 16 * (size_t)(max_ctx_pad + 16));
        uint16_t *probs = aligned_alloc(64, sizeof(uint16_t) * 16 * (size_t)(max_ctx_pad + 32));
        uint16_t qbuf[16 * MAX_HEAD_DIM] __attribute__((aligned(64)));
        float obuf[16 * MAX_HEAD_DIM] __attribute__((aligned(64)));
        float inv_sum[16];
        if (!scores || !probs) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < item_off[chunks]; ++w) {
            if (!scores || !probs) continue;
            int64_t c = 0;
            while (item_off[c + 1] <= w) ++c;
            const int64_t first = info[3 * c], n = info[3 * c + 1], ctx = info[3 * c + 2];
            const int64_t ctx_pad = (ctx + 31) / 32 * 32, qtiles = (n + 15) / 16;
            const int64_t local = w - item_off[c];
            const int64_t qt = qtiles - 1 - local / num_kv_heads, kvh = local % num_kv_heads;
            const int64_t rows = n - 16 * qt < 16 ? n - 16 * qt : 16;
            const int64_t pos0 = ctx - n + 16 * qt;     /* position of the tile's first query */
            const int64_t visible = pos0 + rows;          /* keys the last row sees */
            const int64_t pairs = (visible + 31) / 32;
            const int64_t width = pairs * 32;
            /* Row strides of the score and probability buffers, padded by 64 bytes: a power-of-two
             * stride puts all 16 rows of a tile in one L1 set. */
            const int64_t sstride = width + 16, pstride = width + 32;
            const uint32_t *kbase = kpack + pack_off[c] + kvh * ctx_pad * D / 2;
            const uint32_t *vbase = vpack + pack_off[c] + kvh * ctx_pad * D / 2;
            for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
                for (int64_t r = 0; r < 16; ++r) {
                    if (r < rows) memcpy(qbuf + r * D, q + (first + 16 * qt + r) * q_stride + h * D, (size_t)D * 2);
                    else memset(qbuf + r * D, 0, (size_t)D * 2);
                }
                /* S = Q·K^T, 32 keys at a time. */
                for (int64_t kp = 0; kp < pairs; ++kp) {
                    _tile_zero(4);
                    _tile_zero(5);
                    for (int64_t dc = 0; dc < dchunks; ++dc) {
                        _tile_loadd(0, qbuf + 32 * dc, D * 2);
                        _tile_loadd(1, kbase + ((2 * kp) * dchunks + dc) * 256, 64);
                        _tile_loadd(2, kbase + ((2 * kp + 1) * dchunks + dc) * 256, 64);
                        _tile_dpbf16ps(4, 0, 1);
                        _tile_dpbf16ps(5, 0, 2);
                    }
                    _tile_stored(4, scores + 32 * kp, sstride * 4);
                    _tile_stored(5, scores + 32 * kp + 16, sstride * 4);
                }
                for (int64_t r = 0; r < 16; ++r)
                    inv_sum[r] = r < rows ? softmax_row(scores + r * sstride, probs + r * pstride, pos0 + r + 1,
                                                        width, scale)
                                          : (memset(probs + r * pstride, 0, (size_t)width * 2), 0.f);
                /* O = P·V, up to 4 tiles of 16 head dims at a time. */
                for (int64_t dt0 = 0; dt0 < dtiles; dt0 += 4) {
                    const int64_t nd = dtiles - dt0 < 4 ? dtiles - dt0 : 4;  /* 2 or 4: D is a multiple of 32 */
                    _tile_zero(4);
                    _tile_zero(5);
                    _tile_zero(6);
                    _tile_zero(7);
                    for (int64_t kp = 0; kp < pairs; ++kp) {
                        const uint32_t *vt = vbase + (kp * dtiles + dt0) * 256;
                        _tile_loadd(0, probs + 32 * kp, pstride * 2);
                        _tile_loadd(1, vt, 64);
                        _tile_loadd(2, vt + 256, 64);
                        _tile_dpbf16ps(4, 0, 1);
                        _tile_dpbf16ps(5, 0, 2);
                        if (nd == 4) {
                            _tile_loadd(3, vt + 512, 64);
                            _tile_loadd(1, vt + 768, 64);
                            _tile_dpbf16ps(6, 0, 3);
                            _tile_dpbf16ps(7, 0, 1);
                        }
                    }
                    _tile_stored(4, obuf + 16 * dt0, D * 4);
                    _tile_stored(5, obuf + 16 * (dt0 + 1), D * 4);
                    if (nd == 4) {
                        _tile_stored(6, obuf + 16 * (dt0 + 2), D * 4);
                        _tile_stored(7, obuf + 16 * (dt0 + 3), D * 4);
                    }
                }
                for (int64_t r = 0; r < rows; ++r) {
                    uint16_t *orow = out + (first + 16 * qt + r) * out_stride + h * D;
                    const __m512 inv = _mm512_set1_ps(inv_sum[r]);
                    for (int64_t d = 0; d < D; d += 16)
                        _mm256_storeu_si256((__m256i *)(orow + d),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(obuf + r * D + d), inv)));
                }
            }
        }
        free(scores);
        free(probs);
        _tile_release();
    }
    free(kpack);
    free(vpack);
    free(pack_off);
    free(item_off);
    free(pair_off);
    return failed ? -3 : 0;
#endif
}
