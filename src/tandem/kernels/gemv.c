/* Matrix-vector products for CPU decode: y[r, o] = sum_i x[r, i] * w[o, i] (+ bias[o]).
 *
 * Decoding multiplies 1 to a few activation rows by every weight matrix, so the work is bound
 * by how fast the weights stream from memory. This loop reads each weight row once, in order,
 * with the output rows split across threads (the dot product is dot.h's). Activations and
 * outputs are float32; weights float32 or bfloat16. Built and loaded by cpu_kernels.py.
 */
#include <stdint.h>

#include "dot.h"

static void gemv(const float *x, const void *w, int bf16, const float *bias, float *y, int64_t rows,
                 int64_t out_features, int64_t in_features, int threads) {
    const int64_t row_bytes = in_features * (bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out_features; ++o) {
        const void *w_row = (const char *)w + o * row_bytes;
        const float b = bias ? bias[o] : 0.0f;
        for (int64_t r = 0; r < rows; ++r) y[r * out_features + o] = dot_w(w_row, bf16, x + r * in_features, in_features) + b;
    }
}

void tandem_gemv_f32(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                     int64_t out_features, int64_t in_features, int threads) {
    gemv(x, w, 0, bias, y, rows, out_features, in_features, threads);
}

void tandem_gemv_bf16(const float *x, const uint16_t *w, const float *bias, float *y, int64_t rows,
                      int64_t out_features, int64_t in_features, int threads) {
    gemv(x, w, 1, bias, y, rows, out_features, in_features, threads);
}
