/* RMSNorm, alone and after the residual add, for float32 and bfloat16 rows.
 *
 * Semantics and rounding are kernels/reference/norm.py's (transformers' order): the mean square
 * and the scaling in float32, the normalised row rounded to the dtype, then times the weight and
 * rounded again; the residual add rounds to the dtype. Only the order of the sum of squares
 * differs, so bf16 results match the reference but for a rare last-bit tie. In torch each call is
 * about eight kernels over a few hundred kilobytes: at decode sizes their dispatch and thread
 * hand-offs cost more than the arithmetic; here it is one loop per row.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#ifdef PAGEDSERVE_AVX512
#define DEFINE_ROW_NORM(T, SUFFIX)                                                              \
static int row_norm_##SUFFIX(const T *x, const T *w, T *o, int hidden, float eps) {            \
    if (hidden % 16) return 0;                                                                   \
    __m512 acc = _mm512_setzero_ps();                                                            \
    for (int i = 0; i < hidden; i += 16) {                                                       \
        const __m512 v = vload_##SUFFIX(x + i);                                                  \
        acc = _mm512_fmadd_ps(v, v, acc);                                                        \
    }                                                                                            \
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / hidden + eps));  \
    for (int i = 0; i < hidden; i += 16) {                                                       \
        const __m512 y = vround_##SUFFIX(_mm512_mul_ps(vload_##SUFFIX(x + i), inv));             \
        vstore_##SUFFIX(o + i, _mm512_mul_ps(vload_##SUFFIX(w + i), y));                         \
    }                                                                                            \
    return 1;                                                                                    \
}
#elif defined(PAGEDSERVE_AVX2)
#define DEFINE_ROW_NORM(T, SUFFIX)                                                              \
static int row_norm_##SUFFIX(const T *x, const T *w, T *o, int hidden, float eps) {            \
    if (hidden % 8) return 0;                                                                    \
    __m256 acc = _mm256_setzero_ps();                                                            \
    for (int i = 0; i < hidden; i += 8) {                                                        \
        const __m256 v = v8load_##SUFFIX(x + i);                                                 \
        acc = _mm256_fmadd_ps(v, v, acc);                                                        \
    }                                                                                            \
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(v8sum(acc) / hidden + eps));                 \
    for (int i = 0; i < hidden; i += 8) {                                                        \
        const __m256 y = v8round_##SUFFIX(_mm256_mul_ps(v8load_##SUFFIX(x + i), inv));           \
        v8store_##SUFFIX(o + i, _mm256_mul_ps(v8load_##SUFFIX(w + i), y));                       \
    }                                                                                            \
    return 1;                                                                                    \
}
#else
#define DEFINE_ROW_NORM(T, SUFFIX)                                                              \
static int row_norm_##SUFFIX(const T *x, const T *w, T *o, int hidden, float eps) {            \
    (void)x, (void)w, (void)o, (void)hidden, (void)eps;                                          \
    return 0;                                                                                    \
}
#endif

#define DEFINE_NORM(T, SUFFIX)                                                                  \
DEFINE_ROW_NORM(T, SUFFIX)                                                                       \
/* out[r] = w * round(x[r] * rsqrt(mean(x[r]^2) + eps)); x rows `x_stride` elements apart. */   \
void rms_norm_##SUFFIX(const T *x, int64_t x_stride, const T *w, T *out, int64_t rows,          \
                       int hidden, float eps) {                                                  \
    for (int64_t r = 0; r < rows; r++) {                                                         \
        const T *xr = x + r * x_stride;                                                          \
        T *o = out + r * hidden;                                                                 \
        if (row_norm_##SUFFIX(xr, w, o, hidden, eps)) continue;                                  \
        float sum = 0.0f;                                                                        \
        for (int i = 0; i < hidden; i++) sum += load_##SUFFIX(xr + i) * load_##SUFFIX(xr + i);   \
        const float inv = 1.0f / sqrtf(sum / hidden + eps);                                      \
        for (int i = 0; i < hidden; i++)                                                         \
            store_##SUFFIX(o + i, load_##SUFFIX(w + i) * round_##SUFFIX(load_##SUFFIX(xr + i) * inv)); \
    }                                                                                            \
}                                                                                                \
/* rms_norm of every head of x [tokens, heads, head_dim] (tokens x_stride elements apart, heads \
 * contiguous) into out (tokens out_stride apart); out may be x: each row is read before it is   \
 * written (Qwen3's per-head q/k norm, in place in the fused qkv rows). */                      \
void rms_norm_heads_##SUFFIX(const T *x, int64_t x_stride, const T *w, T *out,                  \
                             int64_t out_stride, int64_t tokens, int heads, int head_dim,       \
                             float eps) {                                                       \
    for (int64_t t = 0; t < tokens; t++)                                                        \
        rms_norm_##SUFFIX(x + t * x_stride, head_dim, w, out + t * out_stride, heads, head_dim, \
                          eps);                                                                  \
}                                                                                                \
/* residual = round(residual + x) in place, then out = rms_norm(residual); all contiguous. */   \
void add_rms_norm_##SUFFIX(const T *x, T *residual, const T *w, T *out, int64_t rows,           \
                           int hidden, float eps) {                                              \
    const int64_t n = rows * hidden;                                                             \
    int64_t i = 0;                                                                               \
    ADD_VECTOR(SUFFIX)                                                                           \
    for (; i < n; i++) store_##SUFFIX(residual + i, load_##SUFFIX(residual + i) + load_##SUFFIX(x + i)); \
    rms_norm_##SUFFIX(residual, hidden, w, out, rows, hidden, eps);                              \
}

#ifdef PAGEDSERVE_AVX512
#define ADD_VECTOR(SUFFIX)                                                                      \
    for (; i + 16 <= n; i += 16)                                                                 \
        vstore_##SUFFIX(residual + i, _mm512_add_ps(vload_##SUFFIX(residual + i), vload_##SUFFIX(x + i)));
#elif defined(PAGEDSERVE_AVX2)
#define ADD_VECTOR(SUFFIX)                                                                      \
    for (; i + 8 <= n; i += 8)                                                                   \
        v8store_##SUFFIX(residual + i, _mm256_add_ps(v8load_##SUFFIX(residual + i), v8load_##SUFFIX(x + i)));
#else
#define ADD_VECTOR(SUFFIX)
#endif

DEFINE_NORM(float, f32)
DEFINE_NORM(uint16_t, bf16)
