/* Helpers shared by the CPU kernels: float32/bfloat16 loads and stores (scalar; 16 lanes of
 * AVX-512, or else 8 lanes of AVX2, where the compiler targets them) and a vector e^x. bf16 stores
 * round to nearest even, as torch's float -> bfloat16 conversion does. */
#ifndef PAGEDSERVE_SIMD_H
#define PAGEDSERVE_SIMD_H

#include <stdint.h>
#include <string.h>

static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float x) { *p = x; }

static inline float load_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_bits(float x) { /* NaN stays NaN */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store_bf16(uint16_t *p, float x) { *p = bf16_bits(x); }

/* x as a tensor of that dtype holds it: unchanged in float32, rounded in bf16. */
static inline float round_f32(float x) { return x; }
static inline float round_bf16(float x) {
    const uint16_t b = bf16_bits(x);
    return load_bf16(&b);
}

/* e^x's reduction and polynomial, shared by the vector versions below: x = n ln2 + r with ln2
 * split in two (Cody-Waite), then Cephes' expf polynomial for e^r. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PAGEDSERVE_AVX512 1
#include <immintrin.h>

static inline __m512 vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore_f32(float *p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline __m512 vround_f32(__m512 x) { return x; }

static inline __m512 vload_bf16(const uint16_t *p) {
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

/* The float32 bit patterns rounded to bf16 in their upper half (finite inputs). */
static inline __m512i vbf16_rounded_bits(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}

static inline void vstore_bf16(uint16_t *p, __m512 x) {
    __m512i u = _mm512_srli_epi32(vbf16_rounded_bits(x), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
}

static inline __m512 vround_bf16(__m512 x) {
    __m512i u = _mm512_and_si512(vbf16_rounded_bits(x), _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_castsi512_ps(u);
}

/* e^x for x <= 0 to float32 accuracy (a few ulp); scalef applies 2^n and underflows gracefully
 * to 0. */
static inline __m512 vexp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#if !defined(PAGEDSERVE_AVX512) && defined(__AVX2__) && defined(__FMA__)
/* CPUs without AVX-512 (Zen 3 and older, many Intel client parts): 8 lanes. */
#define PAGEDSERVE_AVX2 1
#include <immintrin.h>

static inline __m256 v8load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline void v8store_f32(float *p, __m256 x) { _mm256_storeu_ps(p, x); }

static inline __m256 v8load_bf16(const uint16_t *p) {
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

/* Rounded to nearest even like bf16_bits (finite inputs), then the 8 upper halves packed. */
static inline void v8store_bf16(uint16_t *p, __m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    /* packus works within 128-bit lanes: lanes 0 and 1 hold 4 results each in their low halves */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xd8);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* x rounded to bf16 (nearest even, finite inputs), kept as float32 */
static inline __m256 v8round_bf16(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline __m256 v8round_f32(__m256 x) { return x; }

static inline float v8sum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* e^x for x <= 0 as vexp_nonpositive computes it, but 2^n is built in the exponent bits, so x is clamped at -87 (2^n stays normal; e^-87 is 1.6e-38, nothing next to the
 * softmax's largest term, 1). */
static inline __m256 v8exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#endif
