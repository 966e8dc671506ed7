/* Writing one step's keys and values into their cache slots (kernels/reference/kv_write.py's
 * semantics, same dtype on both sides): a token's heads are one stretch of `row` elements in the
 * cache, so each write is two copies. In torch the same is five kernels (mask, nonzero, two
 * index_copy_, a gather) per layer, at decode sizes mostly dispatch. */
#include <stdint.h>
#include <string.h>

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
