/* Matrix-vector products for CPU decode: y[r, o] = sum_i x[r, i] * w[o, i] (+ bias[o]).
 *
 * Decoding multiplies 1 to a few activation rows by every weight matrix, so the work is bound
 * by how fast the weights stream from memory. This loop reads each weight row once, in order,
 * with the output rows split across threads, and lets the compiler vectorize the dot product
 * (-O3 -march=native). Activations and outputs are float32; weights float32 or bfloat16
 * (widened to float32 by a 16-bit shift). Built and loaded by cpu_kernels.py.
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16_to_f32((p)[i])

#define DEFINE_GEMV(NAME, T, LOAD)                                                                \
void NAME(const float *x, const T *w, const float *bias, float *y, int64_t rows,                  \
          int64_t out_features, int64_t in_features, int threads) {                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (int64_t o = 0; o < out_features; ++o) {                                                 \
        const T *w_row = w + o * in_features;                                                     \
        const float b = bias ? bias[o] : 0.0f;                                                    \
        for (int64_t r = 0; r < rows; ++r) {                                                      \
            const float *x_row = x + r * in_features;                                             \
            float acc = 0.0f;                                                                     \
            _Pragma("omp simd reduction(+:acc)")                                                  \
            for (int64_t i = 0; i < in_features; ++i) acc += LOAD(w_row, i) * x_row[i];           \
            y[r * out_features + o] = acc + b;                                                    \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_GEMV(tandem_gemv_f32, float, LOAD_F32)
DEFINE_GEMV(tandem_gemv_bf16, uint16_t, LOAD_BF16)
