/* Helpers shared by the CPU kernels: float32/bfloat16 loads and stores (scalar; 16 lanes of
 * AVX-512, or else 8 lanes of AVX2, where the compiler targets them) and a vector e^x. bf16 stores
 * round to nearest even, as torch's float -> bfloat16 conversion does. */
#ifndef PAGEDSERVE_SIMD_H
#define PAGEDSERVE_SIMD_H

#include <math.h>
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

/* float8_e4m3fn, the fp8 KV cache's format: sign, 4 exponent bits (bias 7), 3 mantissa bits;
 * no infinities, 0x7f / 0xff are NaN, largest finite 448. */
static inline float load_fp8(const uint8_t *p) {
    const uint32_t x = *p, mag = x & 0x7fu;
    float f;
    if (mag == 0x7fu) {
        f = NAN;
    } else if (mag < 8u) { /* subnormal: m * 2^-9 */
        f = (float)mag * 0x1p-9f;
    } else { /* the exponent rebiased from 7 to 127: + 120 */
        const uint32_t u = (mag << 20) + (120u << 23);
        memcpy(&f, &u, sizeof f);
    }
    return x & 0x80u ? -f : f;
}

/* x saturated to +-448 and rounded to the nearest e4m3 value (ties to even), as torch's
 * clamp(-448, 448).to(torch.float8_e4m3fn) does; NaN stays NaN. */
static inline uint8_t fp8_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return sign | 0x7fu;
    float a = fabsf(x);
    a = a > 448.0f ? 448.0f : a;
    if (a < 0x1p-6f) return sign | (uint8_t)nearbyintf(a * 512.0f); /* subnormal (8: 2^-6) */
    memcpy(&u, &a, sizeof u);
    u += 0x7ffffu + ((u >> 20) & 1u); /* round the mantissa to 3 bits, ties to even */
    return sign | (uint8_t)((u >> 20) - (120u << 3));
}

/* Element kinds of the kernels' typeless buffers (the KV cache may be narrower than q). */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_FP8 = 2 };

static inline int kind_size(int kind) { return kind == KIND_F32 ? 4 : kind == KIND_BF16 ? 2 : 1; }

static inline float load_kind(const void *p, int64_t i, int kind) {
    if (kind == KIND_F32) return ((const float *)p)[i];
    if (kind == KIND_BF16) return load_bf16((const uint16_t *)p + i);
    return load_fp8((const uint8_t *)p + i);
}

static inline void store_kind(void *p, int64_t i, int kind, float x) {
    if (kind == KIND_F32) ((float *)p)[i] = x;
    else if (kind == KIND_BF16) store_bf16((uint16_t *)p + i, x);
    else ((uint8_t *)p)[i] = fp8_bits(x);
}

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

/* 16 e4m3 values divided by 2^8 (the kernels fold 2^8 into their scales, exactly): each byte
 * moved to the top of a 16-bit lane, shifted right arithmetically by one so its exponent and
 * mantissa sit where fp16 has them (the sign stays in bit 15; its copy in bit 14 is cleared),
 * then widened by the hardware. fp16's exponent bias is 8 more than e4m3's, and its subnormals
 * cover e4m3's, so every finite value comes out exact. The NaN pattern (never written from finite
 * K/V) reads as +-480 / 2^8. */
static inline __m512 vload_fp8_div256(const uint8_t *p) {
    const __m256i x = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8);
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_srai_epi16(x, 1), _mm256_set1_epi16((short)0xbf80)));
}

/* fp8_bits on 16 lanes: normal codes by rounding the float32 bits, subnormal ones by rounding
 * a * 2^9 to an integer (the default rounding mode: ties to even). */
static inline void vstore_fp8(uint8_t *p, __m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
    const __m512 a = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(448.0f)); /* NaN: 448 */
    const __m512i au = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(au, 20), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(au, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7ffff)));
    __m512i code = _mm512_sub_epi32(_mm512_srli_epi32(rounded, 20), _mm512_set1_epi32(120 << 3));
    const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(512.0f)));
    code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-6f), _CMP_LT_OQ), sub);
    code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7f));
    _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign)));
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

#if !defined(PAGEDSERVE_AVX512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
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

/* 8 e4m3 values divided by 2^8, as vload_fp8_div256 widens 16. */
static inline __m256 v8load_fp8_div256(const uint8_t *p) {
    const __m128i x = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8);
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(x, 1), _mm_set1_epi16((short)0xbf80)));
}

/* fp8_bits on 8 lanes (as vstore_fp8); the low byte of each lane packed into 8 bytes. */
static inline void v8store_fp8(uint8_t *p, __m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
    const __m256 a = _mm256_min_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(448.0f));
    const __m256i au = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(au, 20), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(au, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7ffff)));
    __m256i code = _mm256_sub_epi32(_mm256_srli_epi32(rounded, 20), _mm256_set1_epi32(120 << 3));
    const __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(a, _mm256_set1_ps(512.0f)));
    code = _mm256_blendv_epi8(code, sub, _mm256_castps_si256(
        _mm256_cmp_ps(a, _mm256_set1_ps(0x1p-6f), _CMP_LT_OQ)));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f),
                              _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    code = _mm256_or_si256(code, sign);
    const __m256i bytes = _mm256_shuffle_epi8(code, _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    memcpy(p, &lo, 4);
    memcpy(p + 4, &hi, 4);
}

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
