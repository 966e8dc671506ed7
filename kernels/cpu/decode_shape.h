/* What paged_decode needs to know of a layer's attention and of the step's index tensors: shared by
 * paged_decode.c and layer_loop.c, which fills one per layer (Python mirrors it in
 * kernels/cpu/attention.py's _DecodeShape). */
#ifndef PAGEDSERVE_DECODE_SHAPE_H
#define PAGEDSERVE_DECODE_SHAPE_H
#include <stdint.h>

typedef struct {
    int num_q_heads, num_kv_heads, head_dim, block_size;
    int64_t q_row_stride, out_row_stride, block_table_stride;
    float scale, softcap;
    int sliding_window;
    int q_kind, cache_kind; /* simd.h's KIND_*: q and out, the K/V cache */
    float k_scale, v_scale;
} decode_shape;

#endif
