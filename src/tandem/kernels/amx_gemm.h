/* y = x · W^T with AMX tiles, W bfloat16 in its plain [out, in] layout (header-only; used by
 * amx_linear.c and by the fused decoder, decode_forward.c, inside their OpenMP regions).
 *
 * The weight is the left operand, read straight from memory (16 output features x 32 inputs
 * per tile); x is the right operand, packed first into the tile layout AMX wants (pairs of
 * adjacent inputs in one 32-bit lane, rows as columns), which is cheap since x is small. Each
 * result tile holds 16 features x 16 rows in float32 and is transposed with AVX-512 shuffles on
 * the way out. A work item is 32 features (2 weight tiles) against every row, 32 rows per pass:
 * 4 result tiles, each loaded operand used by two tile multiplies. The weights stream from
 * memory (they are far larger than the caches), so each item prefetches the next one's.
 *
 * Use: amx_pack_job for every job < amx_pack_jobs (split across threads), a barrier, then on
 * every thread amx_configure() and amx_gemm_item for every item < amx_gemm_items. Callers
 * check AMX_GEMM available at compile time and amx_gemm_permitted() at run time.
 */
#ifndef TANDEM_AMX_GEMM_H
#define TANDEM_AMX_GEMM_H
#include <stdint.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BF16__)
#define AMX_GEMM 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out the AMX tile state on request, once per process. */
static inline int amx_gemm_permitted(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* Every tile 16 rows x 64 bytes. Per thread, and again after other code configured the tiles. */
static inline void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* In-register transpose of 16 rows of 16 floats. */
static inline void amx_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* r[4k + b], 128-bit lane L: element 4L + b of rows 4k .. 4k + 3; a 4 x 4 transpose of lanes remains. */
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

static inline int64_t amx_row_tiles(int64_t M) { return (M + 15) / 16; }
static inline int64_t amx_pack_jobs(int64_t M, int64_t K) { return K / 32 * amx_row_tiles(M); }
static inline int64_t amx_gemm_items(int64_t N) { return (N / 16 + 1) / 2; }
/* Bytes of the packed x. */
static inline int64_t amx_pack_bytes(int64_t M, int64_t K) { return amx_pack_jobs(M, K) * 1024; }

/* Pack one tile of x: inputs 32 kc .. +32 of rows 16 mt .. +16, dword (i, t) = the input pair
 * (2i, 2i + 1) of row t; rows past M are zero. x is bfloat16 (x16) or float32 holding
 * bfloat16-exact values (x32, converted exactly), row stride x_stride elements. */
static inline void amx_pack_job(const uint16_t *x16, const float *x32, int64_t x_stride, int64_t M, int64_t K,
                                int64_t job, uint32_t *xp) {
    const int64_t mtiles = amx_row_tiles(M), kc = job / mtiles, mt = job % mtiles;
    (void)K;
    uint32_t *dst = xp + job * 256;
    for (int64_t t = 0; t < 16; ++t) {
        const int64_t row = 16 * mt + t;
        if (row >= M) {
            for (int i = 0; i < 16; ++i) dst[i * 16 + t] = 0;
            continue;
        }
        uint32_t pairs[16];
        if (x16) {
            memcpy(pairs, x16 + row * x_stride + 32 * kc, 64);
        } else {
            const float *src = x32 + row * x_stride + 32 * kc;
            _mm512_storeu_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src)));
        }
        for (int i = 0; i < 16; ++i) dst[i * 16 + t] = pairs[i];
    }
}

/* Work item np: features 32 np .. +32 of y for every row. Results go to y16 (bfloat16, bias
 * added, rounded once) or, when y16 is NULL, to y32 (float32, no bias); row stride y_stride. */
static inline void amx_gemm_item(int64_t np, const uint32_t *xp, int64_t M, int64_t K, const uint16_t *w,
                                 int64_t N, const float *bias, uint16_t *y16, float *y32, int64_t y_stride) {
    const int64_t kchunks = K / 32, mtiles = amx_row_tiles(M), ntiles = N / 16;
    const int64_t n0 = 2 * np, nts = ntiles - n0 < 2 ? 1 : 2;
    const uint16_t *w0 = w + n0 * 16 * K, *w1 = w0 + 16 * K;
    float ybuf[4][256] __attribute__((aligned(64)));
    for (int64_t m0 = 0; m0 < mtiles; m0 += 2) {
        const int64_t mts = mtiles - m0 < 2 ? 1 : 2;
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t kc = 0; kc < kchunks; ++kc) {
            const uint32_t *b = xp + (kc * mtiles + m0) * 256;
            /* Fetch the next item's weight rows into L2 while this one computes: one cache line
             * per row per k step, so the whole 32 x K block arrives during the first pass. */
            if (m0 == 0 && n0 + 2 < ntiles) {
                const char *next = (const char *)(w0 + 32 * K) + 64 * kc;
                const int64_t nrows = ntiles - n0 - 2 < 2 ? 16 : 32;
                for (int64_t r = 0; r < nrows; ++r) _mm_prefetch(next + r * K * 2, _MM_HINT_T1);
            }
            _tile_loadd(0, w0 + 32 * kc, K * 2);
            _tile_loadd(2, b, 64);
            _tile_dpbf16ps(4, 0, 2);
            if (mts > 1) {
                _tile_loadd(3, b + 256, 64);
                _tile_dpbf16ps(5, 0, 3);
            }
            if (nts > 1) {
                _tile_loadd(1, w1 + 32 * kc, K * 2);
                _tile_dpbf16ps(6, 1, 2);
                if (mts > 1) _tile_dpbf16ps(7, 1, 3);
            }
        }
        /* ybuf[2 n + m] = features of weight tile n0 + n x rows of tile m0 + m. */
        _tile_stored(4, ybuf[0], 64);
        if (mts > 1) _tile_stored(5, ybuf[1], 64);
        if (nts > 1) {
            _tile_stored(6, ybuf[2], 64);
            if (mts > 1) _tile_stored(7, ybuf[3], 64);
        }
        for (int64_t nn = 0; nn < nts; ++nn) {
            const int64_t col = 16 * (n0 + nn);
            const __m512 vb = bias && y16 ? _mm512_loadu_ps(bias + col) : _mm512_setzero_ps();
            for (int64_t mm = 0; mm < mts; ++mm) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(ybuf[2 * nn + mm] + 16 * i);
                amx_transpose16(r); /* r[t] = the 16 features of row t */
                const int64_t base = 16 * (m0 + mm), rows = M - base < 16 ? M - base : 16;
                for (int64_t t = 0; t < rows; ++t) {
                    if (y16)
                        _mm256_storeu_si256((__m256i *)(y16 + (base + t) * y_stride + col),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(r[t], vb)));
                    else
                        _mm512_storeu_ps(y32 + (base + t) * y_stride + col, r[t]);
                }
            }
        }
    }
}
#endif
#endif
