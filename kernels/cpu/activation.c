/* The gated MLP's activations, act(gate) * up, for float32 and bfloat16 rows: SiLU (Llama,
 * Mistral, Qwen, Phi-3) and GELU with the tanh approximation (Gemma's gelu_pytorch_tanh).
 *
 * Semantics and rounding are kernels/reference/activation.py's: act(gate) rounded to the dtype,
 * times up, rounded again. In torch that is three kernels and a temporary; at decode sizes their
 * dispatch, run right after a matmul has pushed the interpreter's state out of the caches, costs
 * several times the arithmetic. Here it is one pass. Large inputs (prompt chunks) split their rows
 * over torch's OpenMP threads, as torch's own kernels do.
 *
 * Both are g * sigmoid(z): silu has z = g; gelu_tanh has z = 2u with u = sqrt(2/pi) (g + 0.044715
 * g^3), since 0.5 (1 + tanh(u)) = sigmoid(2u). sigmoid comes from e = exp(-|z|) (never
 * overflows): 1 / (1 + e) for z >= 0, e / (1 + e) below. (No cancellation for very negative g,
 * where 1 + tanh(u) in torch's form loses its digits.)
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* rows below this many elements in all stay on the calling thread */
#define PARALLEL_ELEMENTS 65536

/* gelu_tanh's z = g * (GELU_K0 + GELU_K1 * g^2): 2 sqrt(2/pi) and 2 sqrt(2/pi) 0.044715 */
#define GELU_K0 1.5957691216057308f
#define GELU_K1 0.07135481627159046f

static inline float z_silu(float g) { return g; }
static inline float z_gelu_tanh(float g) { return g * (GELU_K0 + GELU_K1 * g * g); }

static inline float gated(float g, float z) {
    const float e = expf(-fabsf(z));
    return g * (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

#if defined(PAGEDSERVE_AVX512)
static inline __m512 vz_silu(__m512 g) { return g; }
static inline __m512 vz_gelu_tanh(__m512 g) {
    return _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(GELU_K1),
                                            _mm512_set1_ps(GELU_K0)));
}

#define DEFINE_VECTOR_ROW(ACT, T, SUFFIX)                                                       \
static int vector_row_##ACT##_##SUFFIX(const T *g, const T *u, T *o, int d) {                  \
    int j = 0;                                                                                  \
    for (; j + 16 <= d; j += 16) {                                                              \
        const __m512 x = vload_##SUFFIX(g + j), z = vz_##ACT(x);                                \
        const __m512 e = vexp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z))); \
        const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);           \
        const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);                                    \
        const __m512 s = vround_##SUFFIX(_mm512_div_ps(num, _mm512_add_ps(e, _mm512_set1_ps(1.0f)))); \
        vstore_##SUFFIX(o + j, _mm512_mul_ps(s, vload_##SUFFIX(u + j)));                        \
    }                                                                                           \
    return j;                                                                                   \
}
#elif defined(PAGEDSERVE_AVX2)
static inline __m256 v8z_silu(__m256 g) { return g; }
static inline __m256 v8z_gelu_tanh(__m256 g) {
    return _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(GELU_K1),
                                            _mm256_set1_ps(GELU_K0)));
}

#define DEFINE_VECTOR_ROW(ACT, T, SUFFIX)                                                       \
static int vector_row_##ACT##_##SUFFIX(const T *g, const T *u, T *o, int d) {                  \
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);                      \
    int j = 0;                                                                                  \
    for (; j + 8 <= d; j += 8) {                                                                \
        const __m256 x = v8load_##SUFFIX(g + j), z = v8z_##ACT(x);                              \
        const __m256 e = v8exp_nonpositive(_mm256_or_ps(z, sign)); /* exp(-|z|) */             \
        const __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);                   \
        const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), neg);                       \
        const __m256 s = v8round_##SUFFIX(_mm256_div_ps(num, _mm256_add_ps(e, one)));           \
        v8store_##SUFFIX(o + j, _mm256_mul_ps(s, v8load_##SUFFIX(u + j)));                      \
    }                                                                                           \
    return j;                                                                                   \
}
#else
#define DEFINE_VECTOR_ROW(ACT, T, SUFFIX)                                                       \
static int vector_row_##ACT##_##SUFFIX(const T *g, const T *u, T *o, int d) {                  \
    (void)g, (void)u, (void)o, (void)d;                                                         \
    return 0;                                                                                   \
}
#endif

/* out[r] = round(round(act(x[r, :d])) * x[r, d:2d]); x rows `x_stride` elements apart, out
 * contiguous [rows, d]. */
#define DEFINE_ACT_AND_MUL(ACT, T, SUFFIX)                                                      \
DEFINE_VECTOR_ROW(ACT, T, SUFFIX)                                                               \
void ACT##_and_mul_##SUFFIX(const T *x, int64_t x_stride, T *out, int64_t rows, int d) {       \
    _Pragma("omp parallel for if(rows * d >= PARALLEL_ELEMENTS)")                               \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const T *g = x + r * x_stride, *u = g + d;                                              \
        T *o = out + r * d;                                                                     \
        for (int j = vector_row_##ACT##_##SUFFIX(g, u, o, d); j < d; j++) {                     \
            const float gj = load_##SUFFIX(g + j);                                              \
            store_##SUFFIX(o + j, round_##SUFFIX(gated(gj, z_##ACT(gj))) * load_##SUFFIX(u + j)); \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_ACT_AND_MUL(silu, float, f32)
DEFINE_ACT_AND_MUL(silu, uint16_t, bf16)
DEFINE_ACT_AND_MUL(gelu_tanh, float, f32)
DEFINE_ACT_AND_MUL(gelu_tanh, uint16_t, bf16)
