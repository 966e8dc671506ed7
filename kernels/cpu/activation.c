/* SiLU-and-mul (the gated MLP's activation) for float32 and bfloat16 rows.
 *
 * Semantics and rounding are kernels/reference/activation.py's: silu(gate) rounded to the dtype,
 * times up, rounded again. In torch that is three kernels and a temporary; at decode sizes their
 * dispatch, run right after a matmul has pushed the interpreter's state out of the caches, costs
 * several times the arithmetic. Here it is one pass. Large inputs (prompt chunks) split their rows
 * over torch's OpenMP threads, as torch's own kernels do.
 *
 * silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) (never overflows): 1 / (1 + e) for
 * g >= 0, e / (1 + e) below.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* rows below this many elements in all stay on the calling thread */
#define PARALLEL_ELEMENTS 65536

static inline float silu(float g) {
    const float e = expf(-fabsf(g));
    return g * (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

#if defined(PAGEDSERVE_AVX512)
#define DEFINE_VECTOR_ROW(T, SUFFIX)                                                            \
static int vector_row_##SUFFIX(const T *g, const T *u, T *o, int d) {                          \
    int j = 0;                                                                                  \
    for (; j + 16 <= d; j += 16) {                                                              \
        const __m512 x = vload_##SUFFIX(g + j);                                                 \
        const __m512 e = vexp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x))); \
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);           \
        const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);                                    \
        const __m512 s = vround_##SUFFIX(_mm512_div_ps(num, _mm512_add_ps(e, _mm512_set1_ps(1.0f)))); \
        vstore_##SUFFIX(o + j, _mm512_mul_ps(s, vload_##SUFFIX(u + j)));                        \
    }                                                                                           \
    return j;                                                                                   \
}
#elif defined(PAGEDSERVE_AVX2)
#define DEFINE_VECTOR_ROW(T, SUFFIX)                                                            \
static int vector_row_##SUFFIX(const T *g, const T *u, T *o, int d) {                          \
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);                      \
    int j = 0;                                                                                  \
    for (; j + 8 <= d; j += 8) {                                                                \
        const __m256 x = v8load_##SUFFIX(g + j);                                                \
        const __m256 e = v8exp_nonpositive(_mm256_or_ps(x, sign)); /* exp(-|x|) */             \
        const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);                   \
        const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), neg);                       \
        const __m256 s = v8round_##SUFFIX(_mm256_div_ps(num, _mm256_add_ps(e, one)));           \
        v8store_##SUFFIX(o + j, _mm256_mul_ps(s, v8load_##SUFFIX(u + j)));                      \
    }                                                                                           \
    return j;                                                                                   \
}
#else
#define DEFINE_VECTOR_ROW(T, SUFFIX)                                                            \
static int vector_row_##SUFFIX(const T *g, const T *u, T *o, int d) {                          \
    (void)g, (void)u, (void)o, (void)d;                                                         \
    return 0;                                                                                   \
}
#endif

/* out[r] = round(round(silu(x[r, :d])) * x[r, d:2d]); x rows `x_stride` elements apart, out
 * contiguous [rows, d]. */
#define DEFINE_SILU_AND_MUL(T, SUFFIX)                                                          \
DEFINE_VECTOR_ROW(T, SUFFIX)                                                                    \
void silu_and_mul_##SUFFIX(const T *x, int64_t x_stride, T *out, int64_t rows, int d) {        \
    _Pragma("omp parallel for if(rows * d >= PARALLEL_ELEMENTS)")                               \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const T *g = x + r * x_stride, *u = g + d;                                              \
        T *o = out + r * d;                                                                     \
        for (int j = vector_row_##SUFFIX(g, u, o, d); j < d; j++)                               \
            store_##SUFFIX(o + j, round_##SUFFIX(silu(load_##SUFFIX(g + j))) * load_##SUFFIX(u + j)); \
    }                                                                                           \
}

DEFINE_SILU_AND_MUL(float, f32)
DEFINE_SILU_AND_MUL(uint16_t, bf16)
