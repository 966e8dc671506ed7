/* Writing one step's keys and values into their cache slots (kernels/reference/kv_write.py's
 * semantics): a token's heads are one stretch of `row` elements in the cache, so each write is two
 * copies, or two converted copies when the cache is narrower than K/V (bf16 under float32, fp8).
 * In torch the same is five kernels (mask, nonzero, two index_copy_, a gather) per layer, at
 * decode sizes mostly dispatch. */
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* Token t's key row (key + t * key_stride, `row` contiguous elements of `elem` bytes) goes to slot
 * slots[t] of k_cache, its value likewise; a negative slot (padding) is skipped. Returns the first
 * token whose slot is num_slots or more without writing anything, or -1 when all were written
 * (a step's tokens are far fewer than 2^31). */
int write_kv(const char *key, int64_t key_stride, const char *value, int64_t value_stride,
             char *k_cache, char *v_cache, const int64_t *slots, int64_t tokens, int64_t row,
             int64_t elem, int64_t num_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return (int)t;
    const int64_t bytes = row * elem;
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * bytes, key + t * key_stride * elem, bytes);
        memcpy(v_cache + slots[t] * bytes, value + t * value_stride * elem, bytes);
    }
    return -1;
}

/* n elements of kind src_kind (float32 or bf16) into dst_kind (bf16, or fp8 after dividing by
 * scale): rounded to nearest even either way, fp8 saturated to +-448. */
static void convert_row(const void *src, int src_kind, void *dst, int dst_kind, int64_t n,
                        float scale) {
    int64_t i = 0;
#if defined(PAGEDSERVE_AVX512)
    const __m512 vs = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = src_kind == KIND_BF16 ? vload_bf16((const uint16_t *)src + i)
                                               : vload_f32((const float *)src + i);
        if (dst_kind == KIND_FP8) vstore_fp8((uint8_t *)dst + i, _mm512_div_ps(x, vs));
        else vstore_bf16((uint16_t *)dst + i, x);
    }
#elif defined(PAGEDSERVE_AVX2)
    const __m256 vs = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = src_kind == KIND_BF16 ? v8load_bf16((const uint16_t *)src + i)
                                               : v8load_f32((const float *)src + i);
        if (dst_kind == KIND_FP8) v8store_fp8((uint8_t *)dst + i, _mm256_div_ps(x, vs));
        else v8store_bf16((uint16_t *)dst + i, x);
    }
#endif
    for (; i < n; i++) {
        const float x = load_kind(src, i, src_kind);
        store_kind(dst, i, dst_kind, dst_kind == KIND_FP8 ? x / scale : x);
    }
}

/* write_kv for a cache narrower than K/V: src_kind / dst_kind are simd.h's KIND_*; an fp8 cache
 * stores key / k_scale and value / v_scale. Same slots and return value as write_kv. */
int write_kv_convert(const char *key, int64_t key_stride, const char *value, int64_t value_stride,
                     char *k_cache, char *v_cache, const int64_t *slots, int64_t tokens,
                     int64_t row, int src_kind, int dst_kind, float k_scale, float v_scale,
                     int64_t num_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return (int)t;
    const int64_t in = kind_size(src_kind), out = row * kind_size(dst_kind);
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        convert_row(key + t * key_stride * in, src_kind, k_cache + slots[t] * out, dst_kind, row,
                    k_scale);
        convert_row(value + t * value_stride * in, src_kind, v_cache + slots[t] * out, dst_kind,
                    row, v_scale);
    }
    return -1;
}
