/* Attention over the paged KV cache, reading K/V blocks in place through a block table.
 *
 * Each query row r (a decode token, or one token of a prefill chunk) attends to the first
 * ctx_lens[r] tokens of the sequence whose block table is block_tables[row_table[r]]; token t
 * of that sequence lives at slot table[t / block_size] * block_size + t % block_size of the
 * caches [num_slots, num_kv_heads, head_dim]. No copy of the context is made.
 *
 * Work item = (row, kv head): the query heads sharing that KV head (GQA group) are handled
 * together, so each K/V row is loaded once for the whole group. Per block of block_size tokens:
 * the group's scores, then an online-softmax update (running max m and sum l per head, the
 * accumulator rescaled when the max grows), then the weighted V rows are added. Math in float32;
 * the caches are float32 or bfloat16. The exp of a block's scores is one vectorizable loop
 * (-ffast-math lets the compiler call glibc's vector expf; it also rules out infinities, so the
 * running max starts at -1e30, not -inf).
 *
 * With AVX-512 and a head size that is a multiple of 16, an intrinsics path keeps the group's
 * queries and accumulators in registers. Other shapes take the portable loops.
 *
 * bfloat16 caches with a head size that is a multiple of 32 and AVX512-BF16 (the common decode
 * case) use the query rounded to bfloat16 (it is bfloat16 in a bfloat16 model):
 *  - With AMX (Sapphire Rapids on): tiles of 16 tokens, the probabilities rounded to bfloat16
 *    before P.V (as in FlashAttention); both products are tile multiplies, reading K and V in place
 *    (a tile's 16 rows are 16 consecutive slots, so block_size must be a multiple of 16):
 *    scores^T [16 tokens x heads] = K [16 x 32 dims] . Q^T, summed over the head's 32-dim
 *    slices; each head's column is then gathered into a vector of 16 token scores for the online
 *    softmax. For P.V the V tile [16 tokens x 32 dims] is used as it lies in the cache: the tile
 *    multiply sums each dim pair (2n, 2n+1) of a row, so the P tile gives head g two rows,
 *    (p_t, 0) pairs that pick the even dims and (0, p_t) pairs that pick the odd ones; the
 *    even/odd halves are interleaved once at the end.
 *  - Without AMX (or a group over 8, or other block sizes), per token: vdpbf16ps straight from
 *    the cache and one horizontal sum per (token, head), V widened to float32. (A 16-token
 *    AVX-512 variant, scores summed by a transpose-and-add tree and P.V two tokens per
 *    vdpbf16ps, was ~1.6x faster with the data in cache but ~20% slower reading distinct blocks
 *    from memory on the 2-core Sapphire Rapids, so it is not kept.)
 *
 * Built and loaded by paged_attention.py (cc -O3 -march=native -fopenmp -ffast-math).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "avx512_math.h"
#include "dot.h"
#include "paged_attention.h"

#define MAX_GROUP 32     /* query heads per KV head */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64     /* tokens per KV block */
#define CHUNK_TOKENS 256 /* AVX-512 path: tokens scored between two softmax updates */
#ifndef ROWS_OUTER_MIN
#define ROWS_OUTER_MIN 4 /* rows per thread from which threads split rows, not (row, head) items (~8% faster at batch 64) */
#endif
#define NEG_BIG (-1e30f)

/* Turns a block's raw scores s[g][0..n) into probabilities relative to the new running max;
 * returns, per head, the factor the accumulator must be scaled by. */
static inline void softmax_update(float s[][MAX_BLOCK], int64_t group, int64_t n, float *m, float *l,
                                  float *correction) {
    for (int64_t g = 0; g < group; ++g) {
        float block_max = s[g][0];
        for (int64_t t = 1; t < n; ++t) block_max = s[g][t] > block_max ? s[g][t] : block_max;
        const float new_max = block_max > m[g] ? block_max : m[g];
        correction[g] = expf(m[g] - new_max);
        float sum = 0.f;
        float *row = s[g];
#pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < n; ++t) { row[t] = expf(row[t] - new_max); sum += row[t]; }
        l[g] = l[g] * correction[g] + sum;
        m[g] = new_max;
    }
}

/* ---- portable path ---- */

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16f((p)[i])

#define DEFINE_PORTABLE_ITEM(NAME, T, LOAD)                                                        \
static void NAME(const float *q, const T *k_cache, const T *v_cache, const int64_t *table,         \
                 int64_t ctx, float *out, int64_t group, int64_t head_dim, int64_t slot_stride,    \
                 int64_t block_size, float scale) {                                                 \
    float qs[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];                               \
    float s[MAX_GROUP][MAX_BLOCK], m[MAX_GROUP], l[MAX_GROUP], correction[MAX_GROUP];              \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        for (int64_t d = 0; d < head_dim; ++d) { qs[g][d] = q[g * head_dim + d] * scale; acc[g][d] = 0.f; } \
        m[g] = NEG_BIG;                                                                            \
        l[g] = 0.f;                                                                                \
    }                                                                                              \
    for (int64_t start = 0; start < ctx; start += block_size) {                                    \
        const int64_t n = ctx - start < block_size ? ctx - start : block_size;                     \
        const int64_t base = table[start / block_size] * block_size;                               \
        for (int64_t t = 0; t < n; ++t) {                                                          \
            const T *kr = k_cache + (base + t) * slot_stride;                                      \
            for (int64_t g = 0; g < group; ++g) {                                                  \
                float dot = 0.f;                                                                   \
                _Pragma("omp simd reduction(+:dot)")                                               \
                for (int64_t d = 0; d < head_dim; ++d) dot += qs[g][d] * LOAD(kr, d);              \
                s[g][t] = dot;                                                                     \
            }                                                                                      \
        }                                                                                          \
        softmax_update(s, group, n, m, l, correction);                                             \
        for (int64_t g = 0; g < group; ++g)                                                        \
            for (int64_t d = 0; d < head_dim; ++d) acc[g][d] *= correction[g];                     \
        for (int64_t t = 0; t < n; ++t) {                                                          \
            const T *vr = v_cache + (base + t) * slot_stride;                                      \
            for (int64_t g = 0; g < group; ++g) {                                                  \
                const float p = s[g][t];                                                           \
                _Pragma("omp simd")                                                                \
                for (int64_t d = 0; d < head_dim; ++d) acc[g][d] += p * LOAD(vr, d);               \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;                                           \
        for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = acc[g][d] * inv;            \
    }                                                                                              \
}

DEFINE_PORTABLE_ITEM(item_portable_f32, float, LOAD_F32)
DEFINE_PORTABLE_ITEM(item_portable_bf16, uint16_t, LOAD_BF16)

/* ---- AVX-512 path ---- */

#if defined(__AVX512F__)
#include <immintrin.h>
#define MAX_VECS (MAX_HEAD_DIM / 16)

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* Ask for the next block's K and V rows of this head while this block is computed: a block's
 * rows are strided by the other heads' data, and without the hint each row was a cache miss
 * (decode attention read DRAM at ~8 GB/s on a 2-core machine). */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2  /* how many blocks ahead */
#endif
static inline void prefetch_block(const void *k, const void *v, int64_t tokens, int64_t row_stride_bytes,
                                  int64_t row_bytes) {
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t b = 0; b < row_bytes; b += 64) {
            _mm_prefetch((const char *)k + t * row_stride_bytes + b, _MM_HINT_T0);
            _mm_prefetch((const char *)v + t * row_stride_bytes + b, _MM_HINT_T0);
        }
}

/* softmax_update with 16-lane vectors over a chunk's scores (rows ``stride`` apart), masked at the end. */
static inline void softmax_update_avx512(float *s, int64_t stride, int64_t group, int64_t n, float *m, float *l,
                                         float *correction) {
    for (int64_t g = 0; g < group; ++g) {
        float *row = s + g * stride;
        __m512 vmax = _mm512_set1_ps(NEG_BIG);
        for (int64_t c = 0; c < n; c += 16) {
            const __mmask16 mask = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
            vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_BIG), mask, row + c));
        }
        const float block_max = _mm512_reduce_max_ps(vmax);
        const float new_max = block_max > m[g] ? block_max : m[g];
        const __m512 both = exp512(_mm512_set_ps(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, m[g] - new_max));
        correction[g] = _mm512_cvtss_f32(both);
        const __m512 vnew = _mm512_set1_ps(new_max);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t c = 0; c < n; c += 16) {
            const __mmask16 mask = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
            const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + c), vnew)));
            _mm512_mask_storeu_ps(row + c, mask, p);
            vsum = _mm512_add_ps(vsum, p);
        }
        l[g] = l[g] * correction[g] + _mm512_reduce_add_ps(vsum);
        m[g] = new_max;
    }
}

/* BF16_DOT: 1 = bfloat16 scores with vdpbf16ps (T must be uint16_t). */
#define DEFINE_AVX512_ITEM(NAME, T, LOAD16, BF16_DOT)                                              \
static void NAME(const float *q, const T *k_cache, const T *v_cache, const int64_t *table,         \
                 int64_t ctx, float *out, int64_t group, int64_t head_dim, int64_t slot_stride,    \
                 int64_t block_size, float scale) {                                                 \
    const int64_t vecs = head_dim / 16;                                                            \
    __m512 qv[MAX_GROUP][MAX_VECS], acc[MAX_GROUP][MAX_VECS];                                      \
    float s[MAX_GROUP][CHUNK_TOKENS] __attribute__((aligned(64)));                                 \
    float m[MAX_GROUP], l[MAX_GROUP], correction[MAX_GROUP];                                       \
    const __m512 sc = _mm512_set1_ps(scale);                                                       \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        for (int64_t j = 0; j < vecs; ++j) {                                                       \
            qv[g][j] = _mm512_mul_ps(_mm512_loadu_ps(q + g * head_dim + 16 * j), sc);              \
            acc[g][j] = _mm512_setzero_ps();                                                       \
        }                                                                                          \
        m[g] = NEG_BIG;                                                                            \
        l[g] = 0.f;                                                                                \
    }                                                                                              \
    BF16_PREPARE_QUERY_##BF16_DOT                                                                  \
    for (int64_t b = 0; b < PREFETCH_BLOCKS && b * block_size < ctx; ++b)                          \
        prefetch_block(k_cache + table[b] * block_size * slot_stride, v_cache + table[b] * block_size * slot_stride, \
                       block_size, slot_stride * (int64_t)sizeof(T), head_dim * (int64_t)sizeof(T)); \
    /* Chunks of whole blocks: scores of the chunk, one softmax update, then its V rows. */     \
    const int64_t chunk = block_size * (CHUNK_TOKENS / block_size > 0 ? CHUNK_TOKENS / block_size : 1); \
    for (int64_t start = 0; start < ctx; start += chunk) {                                         \
        const int64_t cn = ctx - start < chunk ? ctx - start : chunk;                              \
        for (int64_t off = 0; off < cn; off += block_size) {                                       \
            const int64_t blk = (start + off) / block_size;                                        \
            const int64_t n = cn - off < block_size ? cn - off : block_size;                       \
            const T *kb = k_cache + table[blk] * block_size * slot_stride;                         \
            if ((blk + PREFETCH_BLOCKS) * block_size < ctx)                                        \
                prefetch_block(k_cache + table[blk + PREFETCH_BLOCKS] * block_size * slot_stride,  \
                               v_cache + table[blk + PREFETCH_BLOCKS] * block_size * slot_stride,  \
                               block_size, slot_stride * (int64_t)sizeof(T), head_dim * (int64_t)sizeof(T)); \
            for (int64_t t = 0; t < n; ++t) {                                                      \
                const T *kr = kb + t * slot_stride;                                                \
                const int64_t st = off + t;                                                        \
                SCORES_##BF16_DOT(LOAD16)                                                          \
            }                                                                                      \
        }                                                                                          \
        softmax_update_avx512(&s[0][0], CHUNK_TOKENS, group, cn, m, l, correction);                \
        for (int64_t g = 0; g < group; ++g) {                                                      \
            if (correction[g] != 1.f) {                                                            \
                const __m512 c = _mm512_set1_ps(correction[g]);                                    \
                for (int64_t j = 0; j < vecs; ++j) acc[g][j] = _mm512_mul_ps(acc[g][j], c);        \
            }                                                                                      \
        }                                                                                          \
        for (int64_t off = 0; off < cn; off += block_size) {                                       \
            const int64_t n = cn - off < block_size ? cn - off : block_size;                       \
            const T *vb = v_cache + table[(start + off) / block_size] * block_size * slot_stride;   \
            for (int64_t t = 0; t < n; ++t) {                                                      \
                const T *vr = vb + t * slot_stride;                                                \
                for (int64_t j = 0; j < vecs; ++j) {                                               \
                    const __m512 v = LOAD16(vr + 16 * j);                                          \
                    for (int64_t g = 0; g < group; ++g)                                            \
                        acc[g][j] = _mm512_fmadd_ps(_mm512_set1_ps(s[g][off + t]), v, acc[g][j]);  \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);                          \
        for (int64_t j = 0; j < vecs; ++j)                                                         \
            _mm512_storeu_ps(out + g * head_dim + 16 * j, _mm512_mul_ps(acc[g][j], inv));          \
    }                                                                                              \
}

/* float32 scores: 16-lane multiply-adds over the head, one horizontal sum per (token, head). */
#define BF16_PREPARE_QUERY_0
#define SCORES_0(LOAD16)                                                                           \
    __m512 k[MAX_VECS];                                                                            \
    for (int64_t j = 0; j < vecs; ++j) k[j] = LOAD16(kr + 16 * j);                                 \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        __m512 d = _mm512_mul_ps(qv[g][0], k[0]);                                                  \
        for (int64_t j = 1; j < vecs; ++j) d = _mm512_fmadd_ps(qv[g][j], k[j], d);                 \
        s[g][st] = _mm512_reduce_add_ps(d);                                                        \
    }

DEFINE_AVX512_ITEM(item_avx512_f32, float, load16_f32, 0)
DEFINE_AVX512_ITEM(item_avx512_bf16_widen, uint16_t, load16_bf16, 0)

#if defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* bfloat16 scores: 32 multiply-adds per vdpbf16ps, straight from the cache. */
#define BF16_PREPARE_QUERY_1                                                                       \
    __m512bh qb[MAX_GROUP][MAX_VECS / 2];                                                          \
    for (int64_t g = 0; g < group; ++g)                                                            \
        for (int64_t j = 0; j < vecs / 2; ++j)                                                     \
            qb[g][j] = _mm512_cvtne2ps_pbh(qv[g][2 * j + 1], qv[g][2 * j]);
#define SCORES_1(LOAD16)                                                                           \
    for (int64_t g = 0; g < group; ++g) {                                                          \
        __m512 d = _mm512_setzero_ps();                                                            \
        for (int64_t j = 0; j < vecs / 2; ++j)                                                     \
            d = _mm512_dpbf16_ps(d, qb[g][j], (__m512bh)_mm512_loadu_si512(kr + 32 * j));          \
        s[g][st] = _mm512_reduce_add_ps(d);                                                        \
    }

DEFINE_AVX512_ITEM(item_avx512_bf16_rows, uint16_t, load16_bf16, 1)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_MAX_GROUP 8 /* 2 * group rows of the P tile */
#define PREFETCH_TOKENS 32 /* how far ahead of the 16 tokens being scored the blocks are prefetched */

/* Linux hands out the AMX tile registers on request (once per process). */
static int amx_ok;
__attribute__((constructor)) static void request_amx(void) {
    amx_ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles: 0 scores^T (tokens x heads), 1 K (16 tokens x 32 dims), 2 Q^T (16 dim pairs x heads),
 * 3 P (2 rows per head x 16 token pairs), 4 V (16 tokens x 32 dims), 5 P.V (2 rows per head x 16 dims). */
static void item_amx_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                          int64_t ctx, float *out, int64_t group, int64_t head_dim, int64_t slot_stride,
                          int64_t block_size, float scale) {
    const int64_t G = group, halves = head_dim / 32, stride_bytes = slot_stride * 2, row_bytes = head_dim * 2;
    struct tile_config cfg __attribute__((aligned(64))) = {.palette = 1};
    const uint8_t rows[6] = {16, 16, 16, (uint8_t)(2 * G), 16, (uint8_t)(2 * G)};
    const uint16_t colsb[6] = {(uint16_t)(4 * G), 64, (uint16_t)(4 * G), 64, 64, 64};
    for (int i = 0; i < 6; ++i) { cfg.rows[i] = rows[i]; cfg.colsb[i] = colsb[i]; }
    _tile_loadconfig(&cfg);

    /* Q^T as the B tile of slice j: row k = for each head the bfloat16 pair (2k, 2k+1) of the slice. */
    uint32_t qt[MAX_VECS / 2][16][AMX_MAX_GROUP] __attribute__((aligned(64)));
    const __m512i by_pair = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(AMX_MAX_GROUP));
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < halves; ++j) {
            const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + g * head_dim + 32 * j + 16), sc),
                                                       _mm512_mul_ps(_mm512_loadu_ps(q + g * head_dim + 32 * j), sc));
            _mm512_i32scatter_epi32(&qt[j][0][g], by_pair, (__m512i)pairs, 4);
        }
    float s[AMX_MAX_GROUP][CHUNK_TOKENS] __attribute__((aligned(64)));
    uint32_t pt[CHUNK_TOKENS / 16][2 * AMX_MAX_GROUP][16] __attribute__((aligned(64))); /* P tiles */
    float sbuf[16][16] __attribute__((aligned(64))), obuf[2 * AMX_MAX_GROUP][16] __attribute__((aligned(64)));
    uint16_t kpad[16 * MAX_HEAD_DIM] __attribute__((aligned(64))), vpad[16 * MAX_HEAD_DIM] __attribute__((aligned(64)));
    __m512 acc_even[AMX_MAX_GROUP][MAX_VECS / 2], acc_odd[AMX_MAX_GROUP][MAX_VECS / 2];
    float m[AMX_MAX_GROUP], l[AMX_MAX_GROUP];
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < halves; ++j) acc_even[g][j] = acc_odd[g][j] = _mm512_setzero_ps();
        m[g] = NEG_BIG;
        l[g] = 0.f;
    }
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    const int64_t nblocks = (ctx + block_size - 1) / block_size;
    int64_t next_prefetch = 0;
    const int64_t chunk = block_size * (CHUNK_TOKENS / block_size > 0 ? CHUNK_TOKENS / block_size : 1);
    for (int64_t start = 0; start < ctx; start += chunk) {
        const int64_t cn = ctx - start < chunk ? ctx - start : chunk;
        const int64_t ntiles = (cn + 15) / 16;
        const uint16_t *kt[CHUNK_TOKENS / 16], *vt[CHUNK_TOKENS / 16];
        int64_t tstride[CHUNK_TOKENS / 16];
        for (int64_t i = 0; i < ntiles; ++i) {
            const int64_t t = start + 16 * i, slot = table[t / block_size] * block_size + t % block_size;
            kt[i] = k_cache + slot * slot_stride;
            vt[i] = v_cache + slot * slot_stride;
            tstride[i] = stride_bytes;
            if (cn - 16 * i < 16) { /* the context's last, partial tile: copied, padded with zeros */
                const int64_t n = cn - 16 * i;
                memset(kpad, 0, sizeof(uint16_t) * 16 * head_dim);
                memset(vpad, 0, sizeof(uint16_t) * 16 * head_dim);
                for (int64_t r = 0; r < n; ++r) {
                    memcpy(kpad + r * head_dim, kt[i] + r * slot_stride, row_bytes);
                    memcpy(vpad + r * head_dim, vt[i] + r * slot_stride, row_bytes);
                }
                kt[i] = kpad;
                vt[i] = vpad;
                tstride[i] = row_bytes;
            }
        }
        /* Scores^T = K Q^T, 16 tokens at a time, K read in place; each head's column gathered. */
        for (int64_t i = 0; i < ntiles; ++i) {
            for (; next_prefetch < nblocks && next_prefetch * block_size < start + 16 * i + PREFETCH_TOKENS + 16; ++next_prefetch)
                prefetch_block(k_cache + table[next_prefetch] * block_size * slot_stride,
                                v_cache + table[next_prefetch] * block_size * slot_stride,
                                block_size, stride_bytes, row_bytes);
            _tile_zero(0);
            for (int64_t j = 0; j < halves; ++j) {
                _tile_loadd(1, kt[i] + 32 * j, tstride[i]);
                _tile_loadd(2, &qt[j][0][0], 4 * AMX_MAX_GROUP);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, &sbuf[0][0], 64);
            for (int64_t g = 0; g < G; ++g) _mm512_store_ps(&s[g][16 * i], _mm512_i32gather_ps(column, &sbuf[0][g], 4));
        }
        /* Online softmax; the P tile rows of head g: (p, 0) pairs for the even dims, (0, p) for the odd. */
        for (int64_t g = 0; g < G; ++g) {
            __m512 vmax = _mm512_set1_ps(NEG_BIG);
            for (int64_t i = 0; i < ntiles; ++i) {
                const int64_t c = 16 * i;
                const __mmask16 mask = cn - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cn - c)) - 1);
                vmax = _mm512_mask_max_ps(vmax, mask, vmax, _mm512_load_ps(&s[g][c]));
            }
            const float chunk_max = _mm512_reduce_max_ps(vmax);
            const float new_max = chunk_max > m[g] ? chunk_max : m[g];
            const __m512 vnew = _mm512_set1_ps(new_max);
            __m512 vsum = _mm512_setzero_ps();
            for (int64_t i = 0; i < ntiles; ++i) {
                const int64_t c = 16 * i;
                const __mmask16 mask = cn - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cn - c)) - 1);
                const __m256bh p = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_load_ps(&s[g][c]), vnew))));
                const __m512i wide = _mm512_cvtepu16_epi32((__m256i)p);
                _mm512_store_si512(pt[i][2 * g], wide);
                _mm512_store_si512(pt[i][2 * g + 1], _mm512_slli_epi32(wide, 16));
                vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
            }
            const float correction = _mm_cvtss_f32(_mm512_castps512_ps128(exp512(_mm512_set1_ps(m[g] - new_max))));
            l[g] = l[g] * correction + _mm512_reduce_add_ps(vsum);
            m[g] = new_max;
            if (correction != 1.f) {
                const __m512 cv = _mm512_set1_ps(correction);
                for (int64_t j = 0; j < halves; ++j) {
                    acc_even[g][j] = _mm512_mul_ps(acc_even[g][j], cv);
                    acc_odd[g][j] = _mm512_mul_ps(acc_odd[g][j], cv);
                }
            }
        }
        /* P.V per 32-dim slice, V read in place: rows 2g / 2g+1 get head g's even / odd dims. */
        for (int64_t j = 0; j < halves; ++j) {
            _tile_zero(5);
            for (int64_t i = 0; i < ntiles; ++i) {
                _tile_loadd(3, &pt[i][0][0], 64);
                _tile_loadd(4, vt[i] + 32 * j, tstride[i]);
                _tile_dpbf16ps(5, 3, 4);
            }
            _tile_stored(5, &obuf[0][0], 64);
            for (int64_t g = 0; g < G; ++g) {
                acc_even[g][j] = _mm512_add_ps(acc_even[g][j], _mm512_load_ps(obuf[2 * g]));
                acc_odd[g][j] = _mm512_add_ps(acc_odd[g][j], _mm512_load_ps(obuf[2 * g + 1]));
            }
        }
    }
    _tile_release();
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int64_t g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
        for (int64_t j = 0; j < halves; ++j) {
            const __m512 e = _mm512_mul_ps(acc_even[g][j], inv), o = _mm512_mul_ps(acc_odd[g][j], inv);
            _mm512_storeu_ps(out + g * head_dim + 32 * j, _mm512_permutex2var_ps(e, first, o));
            _mm512_storeu_ps(out + g * head_dim + 32 * j + 16, _mm512_permutex2var_ps(e, second, o));
        }
    }
}
#endif

/* bfloat16 scores with vdpbf16ps: the AMX item where it applies, else the per-token AVX-512 item. */
static void item_avx512_bf16_dot(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                                 int64_t ctx, float *out, int64_t group, int64_t head_dim, int64_t slot_stride,
                                 int64_t block_size, float scale) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_ok && group <= AMX_MAX_GROUP && block_size % 16 == 0) {
        item_amx_bf16(q, k_cache, v_cache, table, ctx, out, group, head_dim, slot_stride, block_size, scale);
        return;
    }
#endif
    item_avx512_bf16_rows(q, k_cache, v_cache, table, ctx, out, group, head_dim, slot_stride, block_size, scale);
}
#endif
#endif

/* ---- entry points ---- */

typedef tandem_attention_item_f32 item_fn_f32;
typedef tandem_attention_item_bf16 item_fn_bf16;

/* The (row r, kv head kvh) work item of an entry point. */
#define CALL_ITEM                                                                                   \
    item(q + (r * num_heads + kvh * group) * head_dim, k_cache + kvh * head_dim,                    \
         v_cache + kvh * head_dim, block_tables + row_table[r] * max_blocks, ctx_lens[r],             \
         out + (r * num_heads + kvh * group) * head_dim, group, head_dim, slot_stride, block_size, scale)

#define DEFINE_ENTRY(NAME, T, ITEM_T, PICK)                                                        \
int NAME(const float *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,          \
         int64_t max_blocks, const int64_t *row_table, const int64_t *ctx_lens, float *out,          \
         int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,                    \
         int64_t block_size, float scale, int threads) {                                            \
    const int64_t group = num_heads / num_kv_heads;                                                 \
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK) return -1;          \
    const int64_t slot_stride = num_kv_heads * head_dim;                                            \
    ITEM_T item = PICK;                                                                             \
    if (rows >= ROWS_OUTER_MIN * threads) {                                                         \
        /* Many rows: a thread takes all KV heads of one row in turn (its K/V rows are adjacent). */ \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                      \
        for (int64_t r = 0; r < rows; ++r)                                                          \
            for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)                                        \
                CALL_ITEM;                                                                               \
        return 0;                                                                                   \
    }                                                                                               \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)")              \
    for (int64_t r = 0; r < rows; ++r)                                                              \
        for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)                                            \
            CALL_ITEM;                                                                                   \
    return 0;                                                                                       \
}

#if defined(__AVX512F__)
#define PICK_F32 (head_dim % 16 == 0 ? item_avx512_f32 : item_portable_f32)
#if defined(HAVE_BF16_DOT)
#define PICK_BF16 (head_dim % 32 == 0 ? item_avx512_bf16_dot \
                   : head_dim % 16 == 0 ? item_avx512_bf16_widen : item_portable_bf16)
#else
#define PICK_BF16 (head_dim % 16 == 0 ? item_avx512_bf16_widen : item_portable_bf16)
#endif
#else
#define PICK_F32 item_portable_f32
#define PICK_BF16 item_portable_bf16
#endif

DEFINE_ENTRY(tandem_paged_attention_f32, float, item_fn_f32, PICK_F32)
DEFINE_ENTRY(tandem_paged_attention_bf16, uint16_t, item_fn_bf16, PICK_BF16)

/* The per-(row, kv head) function the entries use, for other kernels of this library
 * (decode_forward.c): see paged_attention.h. */
tandem_attention_item_f32 tandem_attention_item_for_f32(int64_t head_dim) { return PICK_F32; }
tandem_attention_item_bf16 tandem_attention_item_for_bf16(int64_t head_dim) { return PICK_BF16; }

/* Which inner path the bf16 entry takes for this head size (for tests): 0 portable, 1 widen, 2 dot. */
int tandem_paged_attention_bf16_path(int64_t head_dim) {
#if defined(__AVX512F__) && defined(HAVE_BF16_DOT)
    if (head_dim % 32 == 0) return 2;
#endif
#if defined(__AVX512F__)
    if (head_dim % 16 == 0) return 1;
#endif
    (void)head_dim;
    return 0;
}
