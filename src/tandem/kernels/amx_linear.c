/* y = x · W^T (+ bias) for a few to a few hundred rows of x, bfloat16, with AMX tiles
 * (the tile work is amx_gemm.h's; this file is its standalone entry for torch tensors).
 *
 * Why: at decode batch sizes (3-32 rows) oneDNN's AMX matmul reached about two thirds of the
 * speed of this kernel, which reads the weight once in its plain layout for all rows.
 * Built with -march=native; without AMX the entry returns -2 and the caller keeps oneDNN.
 */
#include <stdint.h>
#include <stdlib.h>

#include "amx_gemm.h"

int tandem_amx_linear_available(void) {
#if defined(AMX_GEMM)
    return amx_gemm_permitted();
#else
    return 0;
#endif
}

/* x [M, K] bf16 (row stride x_stride elements), w [N, K] bf16 contiguous, bias [N] float32 or
 * NULL, y [M, N] bf16 (row stride y_stride). K a multiple of 32, N of 16.
 * Returns 0, -1 for a shape outside the limits, -2 without AMX, -3 out of memory. */
int tandem_amx_linear_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, const uint16_t *w,
                           int64_t N, const float *bias, uint16_t *y, int64_t y_stride, int threads) {
#if !defined(AMX_GEMM)
    (void)x; (void)x_stride; (void)M; (void)K; (void)w; (void)N; (void)bias; (void)y; (void)y_stride; (void)threads;
    return -2;
#else
    if (K % 32 != 0 || N % 16 != 0 || M < 1) return -1;
    uint32_t *xp = aligned_alloc(64, (size_t)amx_pack_bytes(M, K));
    if (!xp) return -3;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < amx_pack_jobs(M, K); ++job) amx_pack_job(x, 0, x_stride, M, K, job, xp);
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t np = 0; np < amx_gemm_items(N); ++np) amx_gemm_item(np, xp, M, K, w, N, bias, y, 0, y_stride);
        _tile_release();
    }
    free(xp);
    return 0;
#endif
}
