/* Rotary position embedding (neox pairing) in place, for float32 and bfloat16 heads.
 *
 * Semantics and rounding are kernels/reference/rotary.py's: each rotated value is computed in
 * float32 from two products and a sum, then rounded to the tensor's dtype, exactly as the
 * reference's torch ops do (build.py compiles with -std=c11, which keeps gcc from fusing a*b+c
 * into an FMA, so the results are bit-identical). In torch the rotation is about ten kernels over a
 * few hundred kilobytes per layer, so at decode sizes dispatch and thread hand-offs cost more than
 * the arithmetic; here it is one loop.
 */
#include "simd.h"

/* The first `rot` dimensions of every head of x [rows, heads, head_dim] (rows `x_stride` elements
 * apart, heads contiguous) rotated by their position's angles: dimension j pairs with j + rot/2;
 * cos_sin[p] holds rot/2 cosines then rot/2 sines. */
#define DEFINE_ROTARY(T, SUFFIX, LOAD, STORE)                                                    \
void rotary_neox_##SUFFIX(T *x, int64_t x_stride, int64_t rows, int heads, int head_dim,        \
                          const float *cos_sin, int rot, const int64_t *positions) {            \
    const int half = rot / 2;                                                                    \
    for (int64_t r = 0; r < rows; r++) {                                                         \
        const float *cos = cos_sin + positions[r] * rot, *sin = cos + half;                      \
        for (int h = 0; h < heads; h++) {                                                        \
            T *v = x + r * x_stride + (int64_t)h * head_dim;                                     \
            for (int j = 0; j < half; j++) {                                                     \
                const float x1 = LOAD(v + j), x2 = LOAD(v + j + half);                           \
                const float a = x1 * cos[j], b = x2 * sin[j], c = x2 * cos[j], e = x1 * sin[j];  \
                STORE(v + j, a - b);                                                             \
                STORE(v + j + half, c + e);                                                      \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}

DEFINE_ROTARY(float, f32, load_f32, store_f32)
DEFINE_ROTARY(uint16_t, bf16, load_bf16, store_bf16)
