/* y = x · W^T (+ bias) for a few to a few hundred rows of x, bfloat16, with AMX tiles.
 *
 * Why: at decode batch sizes (8-128 rows) oneDNN's AMX matmul reached ~1 TFLOP/s on a 2-core
 * Sapphire Rapids, half of what streaming the weights once allows. Here the weight is the left
 * operand, read straight from its plain [out, in] layout (16 output features x 32 inputs per
 * tile, one pass over the weight for all rows), and the activations the right operand: x is
 * packed once per call into the tile layout AMX wants (pairs of adjacent inputs in one 32-bit
 * lane, rows as columns), which is cheap since x is small. Each result tile holds 16 output
 * features x 16 rows in float32; it is transposed with AVX-512 shuffles on the way out, the bias
 * added, and rounded once to bfloat16 (as oneDNN rounds).
 *
 * Threads split the output features; each work item is 32 features (2 weight tiles) against
 * every row, 32 rows (2 tiles of packed x) per pass: 4 result tiles, each loaded operand used
 * by two tile multiplies.
 * Built with -march=native; without AMX the entry returns -2 and the caller keeps oneDNN.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void configure_tiles(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* In-register transpose of 16 rows of 16 floats. */
static inline void transpose16(__m512 r[16]) {
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
    /* r[4a + b] now holds, per 128-bit lane L, element b of rows 4L'..: finish with lane shuffles. */
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
#endif

int tandem_amx_linear_available(void) {
#if defined(HAVE_AMX)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : 0;
#else
    return 0;
#endif
}

/* x [M, K] bf16 (row stride x_stride elements), w [N, K] bf16 contiguous, bias [N] float32 or
 * NULL, y [M, N] bf16 (row stride y_stride). K a multiple of 32, N of 16.
 * Returns 0, -1 for a shape outside the limits, -2 without AMX, -3 out of memory. */
int tandem_amx_linear_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, const uint16_t *w,
                           int64_t N, const float *bias, uint16_t *y, int64_t y_stride, int threads) {
#if !defined(HAVE_AMX)
    (void)x; (void)x_stride; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y; (void)y_stride; (void)threads;
    return -2;
#else
    if (K % 32 != 0 || N % 16 != 0 || M < 1) return -1;
    const int64_t kchunks = K / 32, mtiles = (M + 15) / 16, ntiles = N / 16;
    /* Packed x: tile (kc, mt) = 16 input pairs x 16 rows, dword (i, t) = x[16 mt + t][32 kc + 2i .. +1]. */
    uint32_t *xp = aligned_alloc(64, (size_t)(kchunks * mtiles) * 1024);
    if (!xp) return -3;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < kchunks * mtiles; ++job) {
            const int64_t kc = job / mtiles, mt = job % mtiles;
            uint32_t *dst = xp + (kc * mtiles + mt) * 256;
            for (int64_t t = 0; t < 16; ++t) {
                const int64_t row = 16 * mt + t;
                if (row >= M) {
                    for (int i = 0; i < 16; ++i) dst[i * 16 + t] = 0;
                    continue;
                }
                const uint32_t *src = (const uint32_t *)(x + row * x_stride + 32 * kc);
                for (int i = 0; i < 16; ++i) dst[i * 16 + t] = src[i];
            }
        }
        configure_tiles();
        float ybuf[4][256] __attribute__((aligned(64)));
        /* Work item: 32 output features (2 weight tiles) against every row, 32 rows (2 tiles of
         * packed x) per pass: 4 result tiles, each loaded operand used by 2 multiplies. */
#pragma omp for schedule(static)
        for (int64_t np = 0; np < (ntiles + 1) / 2; ++np) {
            const int64_t n0 = 2 * np, nts = ntiles - n0 < 2 ? 1 : 2;
            const uint16_t *w0 = w + n0 * 16 * K, *w1 = w0 + 16 * K;
            for (int64_t m0 = 0; m0 < mtiles; m0 += 2) {
                const int64_t mts = mtiles - m0 < 2 ? 1 : 2;
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int64_t kc = 0; kc < kchunks; ++kc) {
                    const uint32_t *b = xp + (kc * mtiles + m0) * 256;
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
                /* ybuf[2 * n + m] = features of weight tile n0 + n x rows of tile m0 + m. */
                _tile_stored(4, ybuf[0], 64);
                if (mts > 1) _tile_stored(5, ybuf[1], 64);
                if (nts > 1) {
                    _tile_stored(6, ybuf[2], 64);
                    if (mts > 1) _tile_stored(7, ybuf[3], 64);
                }
                for (int64_t nn = 0; nn < nts; ++nn) {
                    const __m512 vb = bias ? _mm512_loadu_ps(bias + 16 * (n0 + nn)) : _mm512_setzero_ps();
                    for (int64_t mm = 0; mm < mts; ++mm) {
                        __m512 r[16];
                        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(ybuf[2 * nn + mm] + 16 * i);
                        transpose16(r);  /* r[t] = the 16 features of row t */
                        const int64_t base = 16 * (m0 + mm);
                        const int64_t rows = M - base < 16 ? M - base : 16;
                        for (int64_t t = 0; t < rows; ++t)
                            _mm256_storeu_si256((__m256i *)(y + (base + t) * y_stride + 16 * (n0 + nn)),
                                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(r[t], vb)));
                    }
                }
            }
        }
        _tile_release();
    }
    free(xp);
    return 0;
#endif
}
