/* y = x W^T (+ bias) through a weight-only int8 or int4 weight (kernels/quantized.py's form:
 * w[o][i] = scale[o][g] q[o][i] + offset[o][g], g = i / group), x float32 or bf16, float32 sums.
 *
 * Per group the kernel sums x . q (the codes are small integers, exact in bf16 and float32), then
 *     y += scale_g (x_g . q_g) + offset_g sum(x_g)
 * so a weight costs one multiply-add and the offset one per group, not per weight.
 *
 * Layout (kernels/cpu/quant_linear.py packs it): panels of 16 outputs, each one stream of codes
 * along k, a block of 32 bytes per 2 k (int8) or 4 k (int4):
 *     int8: byte 2j + t of block b   = q[16p + j][2b + t]
 *     int4: byte 2j + t of block b   = q[16p + j][4b + t] | q[16p + j][4b + 2 + t] << 4
 * i.e. each k-pair's 16 outputs x 2 codes are interleaved, the order vdpbf16ps multiplies them in
 * (16 float32 lanes, each summing two bf16 products). Scales and offsets follow as [p][g][16],
 * float32, or float16 where every one of them is a float16 (GGUF stores them so): at int4 with
 * groups of 32 that is a sixth less to read. Rows past n hold code 0 and scale 0.
 *
 * Work: threads take contiguous shares of the panels (see all_panels) and each panel goes a
 * chunk of k (CHUNK) at a time through tiles of up to MR rows. With bf16 x on AVX-512 BF16 the
 * tiles convert the codes in registers as they stream them (vpermw looks int4 codes up as bf16; int8 goes through float32),
 * and so do float32 tiles of 1-2 rows (AVX2 instructions, on AVX-512 CPUs too); elsewhere (more
 * float32 rows, int8 beyond DIRECT_INT8_ROWS bf16 rows, portable C) each chunk is first decoded
 * once into a small buffer (L1) that every tile of rows reads. The codes are prefetched well
 * ahead: a decode step is a stream of them and nothing else.
 *
 * Measured (Zen 5, one thread, weights streamed from memory, bench/quant_gemm.py): at 1 row
 * int8 and int4 read their bytes about as fast as oneDNN's bf16 GEMM reads its own (1.7-2.3x and
 * 2.1-3.4x less time); at 16 rows 1.05-1.45x faster, both bound by the vdpbf16ps rate by then;
 * from 64 rows 0.6-0.95x of its speed (oneDNN's bf16 tiles are the better ones there).
 *
 * quant_gemm_x8 and quant_gemm_x8x2 (same arguments, same layout) quantize x to integers instead,
 * in one int8 pass or two, and sum exactly in int32 with vpdpbusd: see "int8 activations" below.
 * Zen 5, one thread, from 16 to 512 rows: one pass 1.2-2.1x quant_gemm's speed, two 0.75-1.3x
 * (as many multiply instructions as its vdpbf16ps); at 1 row both about the same where the
 * weights stream from memory (35-43 GB/s), one pass 1.5-2x where they are in cache.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define NR 16    /* outputs per panel */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define CHUNK 256 /* k decoded at a time: 8-16 KiB of buffer */
#define AHEAD 8192 /* bytes of codes prefetched ahead (into the next panel): at 1 KiB one Zen 5
                     core streamed a third less than oneDNN's bf16 GEMM does */
#define TABLES_AHEAD 1024 /* bytes of scales (offsets) prefetched ahead */
#define LAST_RUN 2 /* panels: the smallest share a thread takes (see all_panels) */
#define OUT_BLOCK_BYTES (256 << 10) /* outputs of one block of rows (see quant_gemm) */
#define ROW_BLOCK_MIN 64

/* one block of a row of int8 x (the x8 path): its scale, sum(Q) (for the offsets) and -128 sum(Q)
 * (see quads_512), Q the block's integers (one pass: q; two: 255 q1 + q2) */
typedef struct {
    float scale, qsum;
    int32_t corr, pad;
} xblock_t;

/* what one call multiplies, shared by every path */
typedef struct {
    const void *x;
    int64_t x_stride, m, n, k, group;
    const uint8_t *codes;
    const void *scales, *offsets; /* float32, or float16 bits when half_scales */
    const float *xsum, *bias;
    void *out;
    int out_bf16, bits, half_scales;
    /* the x8 path: x as int8 in `passes` planes (1 or 2), in sets of xset rows (see x8_row),
     * and its blocks [m][nb] (NULL: the float path) */
    int64_t xb, nb, xset;
    int passes;
    const int8_t *xq;
    const xblock_t *xblocks;
} job_t;

/* one chunk of a panel: k in [k0, k0 + len), with the row tile's group sums in accm and its
 * outputs in ym ([rows][16] each) */
typedef struct {
    int64_t p, k0, len, r0;
    float *accm, *ym;
} chunk_t;

static int64_t panel_bytes(const job_t *j) { return j->k * NR * j->bits / 8; }

/* the sub-block [s, s + sl) of a chunk: which group, and whether it opens or closes it */
static inline int64_t sub_group(const job_t *j, const chunk_t *c, int64_t s) {
    return (c->k0 + s) / j->group;
}
static inline int opens_group(const job_t *j, const chunk_t *c, int64_t s) {
    return (c->k0 + s) % j->group == 0;
}
static inline int closes_group(const job_t *j, const chunk_t *c, int64_t s, int64_t sl) {
    return (c->k0 + s + sl) % j->group == 0;
}

/* ---------------------------------------------------------------- scalar decode and tile */

static float half_to_float(uint16_t h) {
    const uint32_t e = (h >> 10) & 31, f = h & 1023;
    uint32_t u = (uint32_t)(h & 0x8000) << 16;
    float v;
    if (e == 0) { /* zero or subnormal: f 2^-24, exact in float32 */
        v = (float)f * 5.9604644775390625e-8f;
        return (h & 0x8000) ? -v : v;
    }
    u |= e == 31 ? 0x7f800000u | (f << 13) : ((e + 112) << 23) | (f << 13);
    memcpy(&v, &u, sizeof v);
    return v;
}

/* element i of a scale or offset table */
static inline float table_at(const job_t *j, const void *t, int64_t i) {
    return j->half_scales ? half_to_float(((const uint16_t *)t)[i]) : ((const float *)t)[i];
}

static float code_at(const uint8_t *panel, int bits, int64_t kk, int jj) {
    if (bits == 8) return (float)(int8_t)panel[(kk / 2) * 32 + 2 * jj + (kk & 1)];
    const uint8_t b = panel[(kk / 4) * 32 + 2 * jj + (kk & 1)];
    return (float)((kk & 2) ? b >> 4 : b & 15);
}

/* buf[kk][16] = the chunk's codes as float32 (portable) */
static __attribute__((unused)) void decode_f32_scalar(const job_t *j, const chunk_t *c, float *buf) {
    const uint8_t *panel = j->codes + c->p * panel_bytes(j);
    for (int64_t kk = 0; kk < c->len; kk++)
        for (int jj = 0; jj < NR; jj++) buf[kk * NR + jj] = code_at(panel, j->bits, c->k0 + kk, jj);
}

static float x_at(const job_t *j, int64_t r, int64_t kk, int x_bf16) {
    const int64_t i = r * j->x_stride + kk;
    return x_bf16 ? load_bf16((const uint16_t *)j->x + i) : ((const float *)j->x)[i];
}

/* the group's sums of one row folded into its outputs: y += scale sum + offset sum(x_g) */
static void close_group_scalar(const job_t *j, int64_t row, int64_t p, int64_t g,
                               const float *sum, float *y) {
    const int64_t groups = j->k / j->group;
    const int64_t at = (p * groups + g) * NR;
    const float xs = j->offsets ? j->xsum[row * groups + g] : 0.0f;
    for (int jj = 0; jj < NR; jj++)
        y[jj] += table_at(j, j->scales, at + jj) * sum[jj]
                 + (j->offsets ? table_at(j, j->offsets, at + jj) * xs : 0.0f);
}

static void tile_scalar(const job_t *j, const chunk_t *c, const float *buf, int rows, int x_bf16) {
    const int64_t sl = c->len < j->group ? c->len : j->group;
    for (int r = 0; r < rows; r++)
        for (int64_t s = 0; s < c->len; s += sl) {
            float *acc = c->accm + r * NR;
            if (opens_group(j, c, s)) memset(acc, 0, NR * sizeof(float));
            for (int64_t kk = s; kk < s + sl; kk++) {
                const float xv = x_at(j, c->r0 + r, c->k0 + kk, x_bf16);
                for (int jj = 0; jj < NR; jj++) acc[jj] += xv * buf[kk * NR + jj];
            }
            if (closes_group(j, c, s, sl))
                close_group_scalar(j, c->r0 + r, c->p, sub_group(j, c, s), acc, c->ym + r * NR);
        }
}

/* ---------------------------------------------------------------- AVX2 / AVX-512 decode to f32 */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* One block of 16 outputs x 2 k (a byte each, interleaved) -> buf[0][16], buf[1][16] float32. */
static inline void pair_to_f32(__m256i v, float *buf) {
    /* within each 128-bit lane: the even bytes (first k) then the odd ones (second k) */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xd8);
    const __m128i k0 = _mm256_castsi256_si128(t), k1 = _mm256_extracti128_si256(t, 1);
#ifdef PAGEDSERVE_AVX512
    _mm512_storeu_ps(buf, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(k0)));
    _mm512_storeu_ps(buf + NR, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(k1)));
#else
    _mm256_storeu_ps(buf, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k0)));
    _mm256_storeu_ps(buf + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k0, 8))));
    _mm256_storeu_ps(buf + NR, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(k1)));
    _mm256_storeu_ps(buf + NR + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(k1, 8))));
#endif
}

static void decode_f32(const job_t *j, const chunk_t *c, float *buf) {
    const uint8_t *src = j->codes + c->p * panel_bytes(j) + c->k0 * NR * j->bits / 8;
    if (j->bits == 8) {
        for (int64_t kk = 0; kk < c->len; kk += 2, src += 32) {
            _mm_prefetch((const char *)src + AHEAD, _MM_HINT_T0);
            pair_to_f32(_mm256_loadu_si256((const __m256i *)src), buf + kk * NR);
        }
        return;
    }
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t kk = 0; kk < c->len; kk += 4, src += 32) {
        _mm_prefetch((const char *)src + AHEAD, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i *)src);
        pair_to_f32(_mm256_and_si256(v, low), buf + kk * NR);
        pair_to_f32(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), buf + (kk + 2) * NR);
    }
}
#else
#define decode_f32 decode_f32_scalar
#endif

/* ---------------------------------------------------------------- AVX2 group ends, direct tile */
#if defined(__AVX2__) && defined(__FMA__)
ALWAYS_INLINE __m256 load8_table(const job_t *j, const void *t, int64_t at) {
    if (!j->half_scales) return _mm256_loadu_ps((const float *)t + at);
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)t + at)));
#else
    float v[8];
    for (int i = 0; i < 8; i++) v[i] = table_at(j, t, at + i);
    return _mm256_loadu_ps(v);
#endif
}

ALWAYS_INLINE void close_group_avx2(const job_t *j, int64_t row, int64_t p, int64_t g,
                                    __m256 lo, __m256 hi, float *y) {
    const int64_t groups = j->k / j->group, at = (p * groups + g) * NR;
    __m256 ylo = _mm256_fmadd_ps(lo, load8_table(j, j->scales, at), _mm256_loadu_ps(y));
    __m256 yhi = _mm256_fmadd_ps(hi, load8_table(j, j->scales, at + 8), _mm256_loadu_ps(y + 8));
    if (j->offsets) {
        const __m256 xs = _mm256_set1_ps(j->xsum[row * groups + g]);
        ylo = _mm256_fmadd_ps(xs, load8_table(j, j->offsets, at), ylo);
        yhi = _mm256_fmadd_ps(xs, load8_table(j, j->offsets, at + 8), yhi);
    }
    _mm256_storeu_ps(y, ylo);
    _mm256_storeu_ps(y + 8, yhi);
}

/* Few rows (decode) with float32 x, AVX2 or AVX-512 alike: the codes are converted in registers
 * as they stream, no buffer, and multiplied in their interleaved order: lanes (output, k parity)
 * of 4 outputs per vector times the row's x pair (k, k + 1) repeated; the parities are added
 * once a group is done. One Zen 5 thread, 1 row: twice the speed of the buffer's way. */
#define DIRECT_AVX2_ROWS 2

ALWAYS_INLINE __m256 x_pair8(const float *x) {
    double two;
    memcpy(&two, x, sizeof two);
    return _mm256_castpd_ps(_mm256_set1_pd(two));
}

/* interleaved sums of outputs 0-3, 4-7, 8-11, 12-15 -> outputs 0-7 and 8-15 */
ALWAYS_INLINE void fold_pairs(const __m256 *a, __m256 *lo, __m256 *hi) {
    *lo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(a[0], a[1])), 0xd8));
    *hi = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(a[2], a[3])), 0xd8));
}

ALWAYS_INLINE __m256 int8x8_f32(const uint8_t *src) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)src)));
}

/* 4 k of one row: acc[q] += codes of outputs 4q..4q+3 times their x pairs */
ALWAYS_INLINE void step_direct_avx2(const uint8_t *src, int bits, __m256 x0, __m256 x1, __m256 *acc) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        if (bits == 4) {
            const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * q)));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(e, _mm256_set1_epi32(15)));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(e, 4));
            acc[q] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, acc[q]));
        } else {
            const __m256 w0 = int8x8_f32(src + 8 * q), w1 = int8x8_f32(src + 32 + 8 * q);
            acc[q] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, acc[q]));
        }
    }
}

ALWAYS_INLINE void tile_direct_avx2(const job_t *j, const chunk_t *c, const int R, const int bits) {
    const int64_t sl = c->len < j->group ? c->len : j->group;
    const float *x = (const float *)j->x + c->r0 * j->x_stride + c->k0;
    const uint8_t *src = j->codes + c->p * panel_bytes(j) + c->k0 * NR * bits / 8;
    for (int64_t s = 0; s < c->len; s += sl) {
        __m256 acc[DIRECT_AVX2_ROWS][4];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_ps();
        for (int64_t kk = s; kk < s + sl; kk += 4) {
            _mm_prefetch((const char *)src + kk * NR * bits / 8 + AHEAD, _MM_HINT_T0);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++)
                step_direct_avx2(src + kk * NR * bits / 8, bits, x_pair8(x + r * j->x_stride + kk),
                                 x_pair8(x + r * j->x_stride + kk + 2), acc[r]);
        }
        const int first = opens_group(j, c, s), last = closes_group(j, c, s, sl);
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            __m256 lo, hi;
            fold_pairs(acc[r], &lo, &hi);
            if (!first) {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(c->accm + r * NR));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(c->accm + r * NR + 8));
            }
            if (last) {
                close_group_avx2(j, c->r0 + r, c->p, sub_group(j, c, s), lo, hi, c->ym + r * NR);
            } else {
                _mm256_storeu_ps(c->accm + r * NR, lo);
                _mm256_storeu_ps(c->accm + r * NR + 8, hi);
            }
        }
    }
}

static void tile_avx2_direct(const job_t *j, const chunk_t *c, int rows) {
    if (rows == 1) {
        if (j->bits == 4) tile_direct_avx2(j, c, 1, 4);
        else tile_direct_avx2(j, c, 1, 8);
    } else {
        if (j->bits == 4) tile_direct_avx2(j, c, 2, 4);
        else tile_direct_avx2(j, c, 2, 8);
    }
}
#endif

/* ---------------------------------------------------------------- AVX-512 tiles */
#ifdef PAGEDSERVE_AVX512
#define MR 8 /* rows per tile */

ALWAYS_INLINE __m512 load16_table(const job_t *j, const void *t, int64_t at) {
    /* the tables stream beside the codes, a fraction of their bytes: fetched ahead alike */
    _mm_prefetch((const char *)t + at * (j->half_scales ? 2 : 4) + TABLES_AHEAD, _MM_HINT_T0);
    if (!j->half_scales) return _mm512_loadu_ps((const float *)t + at);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)t + at)));
}

/* The end of a sub-block of the chunk: its group sums (a0 + a1 per row) go into the outputs y
 * when it closes its group, else wait in accm for the chunk that does. */
ALWAYS_INLINE void end_block_512(const job_t *j, const chunk_t *c, int64_t s, int64_t sl,
                                 const __m512 *a0, const __m512 *a1, __m512 *y, const int R) {
    if (!closes_group(j, c, s, sl)) {
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) _mm512_storeu_ps(c->accm + r * NR, _mm512_add_ps(a0[r], a1[r]));
        return;
    }
    const int64_t groups = j->k / j->group, g = sub_group(j, c, s), at = (c->p * groups + g) * NR;
    const __m512 scale = load16_table(j, j->scales, at);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = _mm512_fmadd_ps(_mm512_add_ps(a0[r], a1[r]), scale, y[r]);
    if (!j->offsets) return;
    const __m512 offset = load16_table(j, j->offsets, at);
    const float *xs = j->xsum + c->r0 * groups + g;
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * groups]), offset, y[r]);
}

/* a sub-block's starting sums: zero, or what the previous chunk left of a longer group */
ALWAYS_INLINE void start_block_512(const job_t *j, const chunk_t *c, int64_t s, __m512 *a0,
                                   __m512 *a1, const int R) {
    const int first = opens_group(j, c, s);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        a0[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c->accm + r * NR);
        a1[r] = _mm512_setzero_ps();
    }
}

/* float32 x: buf[kk][16] float32 codes; two sums per row (even and odd k), the outputs in
 * registers across the chunk */
ALWAYS_INLINE void tile_f32_512(const job_t *j, const chunk_t *c, const float *buf, const int R) {
    const int64_t sl = c->len < j->group ? c->len : j->group;
    const float *x = (const float *)j->x + c->r0 * j->x_stride + c->k0;
    __m512 y[MR], a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = _mm512_loadu_ps(c->ym + r * NR);
    for (int64_t s = 0; s < c->len; s += sl) {
        start_block_512(j, c, s, a0, a1, R);
        for (int64_t kk = s; kk < s + sl; kk += 2) {
            const __m512 w0 = _mm512_loadu_ps(buf + kk * NR), w1 = _mm512_loadu_ps(buf + (kk + 1) * NR);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * j->x_stride + kk]), w0, a0[r]);
                a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * j->x_stride + kk + 1]), w1, a1[r]);
            }
        }
        end_block_512(j, c, s, sl, a0, a1, y, R);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_storeu_ps(c->ym + r * NR, y[r]);
}

#if defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* bf16 x: each k-pair's 32 codes become bf16 (interleaved, see the layout above) and one
 * vdpbf16ps per row multiplies them with the row's two x values; products of a bf16 and a small
 * integer are exact in float32, and each is summed in float32 as an FMA would. Each tile of rows
 * converts the codes in registers as it streams them: cheaper than converting them once into a
 * buffer that every tile reads (Zen 5, one thread, 512 x 2048: 10-15% faster at 16 and 64 rows)
 * except for int8 beyond DIRECT_INT8_ROWS rows, where the conversion costs more. */
#define FROM_BUFFER 0 /* `mode` of the tile: bf16 pairs from the buffer, or codes of 4 / 8 bits */
#define DIRECT_INT8_ROWS 16 /* int8 beyond: through the buffer (its conversion costs more) */

/* vpermw looks up the low 5 bits of each word: entries i and i + 16 are both bf16(i) */
static const uint16_t BF16_OF[32] = {
    0, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130,
    0x4140, 0x4150, 0x4160, 0x4170, 0, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

ALWAYS_INLINE __m512bh int8_pair_bf16(const uint8_t *src) {
    const __m128i a = _mm_loadu_si128((const __m128i *)src);
    const __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* the bf16 pairs of k-pairs kk and kk + 2 of a chunk (kk a multiple of 4) */
ALWAYS_INLINE void weights_bf16(const void *src, int64_t kk, const int mode, __m512i table,
                                __m512bh *w0, __m512bh *w1) {
    if (mode == FROM_BUFFER) {
        *w0 = (__m512bh)_mm512_loadu_si512((const uint16_t *)src + kk * NR);
        *w1 = (__m512bh)_mm512_loadu_si512((const uint16_t *)src + (kk + 2) * NR);
    } else if (mode == 8) {
        *w0 = int8_pair_bf16((const uint8_t *)src + kk * NR);
        *w1 = int8_pair_bf16((const uint8_t *)src + (kk + 2) * NR);
    } else {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)((const uint8_t *)src + kk * NR / 2));
        const __m512i v = _mm512_cvtepu8_epi16(bytes);
        *w0 = (__m512bh)_mm512_permutexvar_epi16(v, table);
        *w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
    }
}

static const uint8_t *chunk_codes(const job_t *j, const chunk_t *c) {
    return j->codes + c->p * panel_bytes(j) + c->k0 * NR * j->bits / 8;
}

/* int8 only: int4 tiles always read their codes themselves (see `direct`) */
static void decode_bf16(const job_t *j, const chunk_t *c, uint16_t *buf) {
    const uint8_t *src = chunk_codes(j, c);
    const __m512i table = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < c->len; kk += 4) {
        _mm_prefetch((const char *)src + kk * NR + AHEAD, _MM_HINT_T0);
        __m512bh w0, w1;
        weights_bf16(src, kk, 8, table, &w0, &w1);
        _mm512_storeu_si512(buf + kk * NR, (__m512i)w0);
        _mm512_storeu_si512(buf + (kk + 2) * NR, (__m512i)w1);
    }
}

ALWAYS_INLINE __m512bh x_pair(const uint16_t *x) {
    int32_t two;
    memcpy(&two, x, sizeof two);
    return (__m512bh)_mm512_set1_epi32(two);
}

/* src: the decoded buffer (mode FROM_BUFFER) or the chunk's codes (mode 4 or 8) */
ALWAYS_INLINE void tile_bf16_512(const job_t *j, const chunk_t *c, const void *src, const int R,
                                 const int mode) {
    const int64_t sl = c->len < j->group ? c->len : j->group;
    const uint16_t *x = (const uint16_t *)j->x + c->r0 * j->x_stride + c->k0;
    const __m512i table = _mm512_loadu_si512(BF16_OF);
    __m512 y[MR], a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = _mm512_loadu_ps(c->ym + r * NR);
    for (int64_t s = 0; s < c->len; s += sl) {
        start_block_512(j, c, s, a0, a1, R);
        for (int64_t kk = s; kk < s + sl; kk += 4) {
            if (mode != FROM_BUFFER)
                _mm_prefetch((const char *)src + kk * NR * mode / 8 + AHEAD, _MM_HINT_T0);
            __m512bh w0, w1;
            weights_bf16(src, kk, mode, table, &w0, &w1);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                a0[r] = _mm512_dpbf16_ps(a0[r], w0, x_pair(x + r * j->x_stride + kk));
                a1[r] = _mm512_dpbf16_ps(a1[r], w1, x_pair(x + r * j->x_stride + kk + 2));
            }
        }
        end_block_512(j, c, s, sl, a0, a1, y, R);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_storeu_ps(c->ym + r * NR, y[r]);
}

/* a tile of at most MR rows, its codes converted as they stream past */
static void tile_bf16_direct(const job_t *j, const chunk_t *c, int rows) {
    const uint8_t *src = chunk_codes(j, c);
#define DIRECT(R) case R: if (j->bits == 8) tile_bf16_512(j, c, src, R, 8);                     \
                          else tile_bf16_512(j, c, src, R, 4);                                  \
                          return;
    switch (rows) { DIRECT(1) DIRECT(2) DIRECT(3) DIRECT(4) DIRECT(5) DIRECT(6) DIRECT(7) DIRECT(8) }
#undef DIRECT
}
#endif

/* ---------------------------------------------------------------- AVX2 tile */
#elif defined(PAGEDSERVE_AVX2)
#define MR 6

/* float32 x, buf[kk][16]: a 6 x 16 tile, 12 accumulators (of 16 registers); with 1 or 2 rows
 * a second set takes the odd k, so four FMA chains are in flight, not two */
ALWAYS_INLINE void tile_f32_avx2(const job_t *j, const chunk_t *c, const float *buf, const int R) {
    const int64_t sl = c->len < j->group ? c->len : j->group;
    const float *x = (const float *)j->x + c->r0 * j->x_stride + c->k0;
    const int step = R <= 2 ? 2 : 1;
    for (int64_t s = 0; s < c->len; s += sl) {
        const __m256 zero = _mm256_setzero_ps();
        __m256 lo[MR], hi[MR], lo2[2] = {zero, zero}, hi2[2] = {zero, zero};
        const int first = opens_group(j, c, s);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            lo[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c->accm + r * NR);
            hi[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c->accm + r * NR + 8);
        }
        for (int64_t kk = s; kk < s + sl; kk += step) {
            const __m256 w0 = _mm256_loadu_ps(buf + kk * NR), w1 = _mm256_loadu_ps(buf + kk * NR + 8);
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                const __m256 b = _mm256_broadcast_ss(x + r * j->x_stride + kk);
                lo[r] = _mm256_fmadd_ps(b, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(b, w1, hi[r]);
            }
            if (step == 1) continue;
            const __m256 v0 = _mm256_loadu_ps(buf + (kk + 1) * NR);
            const __m256 v1 = _mm256_loadu_ps(buf + (kk + 1) * NR + 8);
#pragma GCC unroll 2
            for (int r = 0; r < R && r < 2; r++) {
                const __m256 b = _mm256_broadcast_ss(x + r * j->x_stride + kk + 1);
                lo2[r] = _mm256_fmadd_ps(b, v0, lo2[r]);
                hi2[r] = _mm256_fmadd_ps(b, v1, hi2[r]);
            }
        }
        const int last = closes_group(j, c, s, sl);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            if (step == 2) {
                lo[r] = _mm256_add_ps(lo[r], lo2[r]);
                hi[r] = _mm256_add_ps(hi[r], hi2[r]);
            }
            if (last) {
                close_group_avx2(j, c->r0 + r, c->p, sub_group(j, c, s), lo[r], hi[r], c->ym + r * NR);
            } else {
                _mm256_storeu_ps(c->accm + r * NR, lo[r]);
                _mm256_storeu_ps(c->accm + r * NR + 8, hi[r]);
            }
        }
    }
}

#else
#define MR 4
#endif

/* ---------------------------------------------------------------- driver */

#define CASE_BF16(R) case R: tile_bf16_512(j, c, buf, R, FROM_BUFFER); return;
#if defined(PAGEDSERVE_AVX512)
#define CASE_F32(R) case R: tile_f32_512(j, c, buf, R); return;
#else
#define CASE_F32(R) case R: tile_f32_avx2(j, c, buf, R); return;
#endif

/* rows [r0, r0 + rows) of one decoded chunk through this build's tile for x's dtype */
static void tile(const job_t *j, const chunk_t *c, const void *buf, int rows, int x_bf16) {
#if defined(HAVE_BF16_DOT)
    if (x_bf16) {
        switch (rows) { CASE_BF16(1) CASE_BF16(2) CASE_BF16(3) CASE_BF16(4) CASE_BF16(5)
                        CASE_BF16(6) CASE_BF16(7) CASE_BF16(8) }
    }
    switch (rows) { CASE_F32(1) CASE_F32(2) CASE_F32(3) CASE_F32(4) CASE_F32(5) CASE_F32(6)
                    CASE_F32(7) CASE_F32(8) }
#elif defined(PAGEDSERVE_AVX512)
    switch (rows) { CASE_F32(1) CASE_F32(2) CASE_F32(3) CASE_F32(4) CASE_F32(5) CASE_F32(6)
                    CASE_F32(7) CASE_F32(8) }
#elif defined(PAGEDSERVE_AVX2)
    switch (rows) { CASE_F32(1) CASE_F32(2) CASE_F32(3) CASE_F32(4) CASE_F32(5) CASE_F32(6) }
#endif
    tile_scalar(j, c, buf, rows, x_bf16);
}

static void decode(const job_t *j, const chunk_t *c, void *buf, int x_bf16) {
    (void)x_bf16;
#if defined(HAVE_BF16_DOT)
    if (x_bf16) { decode_bf16(j, c, buf); return; }
#endif
    decode_f32(j, c, buf);
}

/* the chunk starting at k0: whole groups up to CHUNK of k, or a piece of one longer group */
static int64_t chunk_len(const job_t *j, int64_t k0) {
    int64_t len = j->group <= CHUNK ? j->group * (CHUNK / j->group) : j->group - k0 % j->group;
    len = len > CHUNK && j->group > CHUNK ? CHUNK : len;
    return len < j->k - k0 ? len : j->k - k0;
}

/* out[r][16p ..] = ym[r] + bias, the panel's real columns only, float32 or bf16 (rounded to
 * nearest even as simd.h's store_bf16) */
static void store_outputs(const job_t *j, int64_t p, const float *ym) {
    const int cols = j->n - p * NR < NR ? (int)(j->n - p * NR) : NR;
#ifdef PAGEDSERVE_AVX512
    const __mmask16 mask = (__mmask16)((1u << cols) - 1);
    const __m512 bias = j->bias ? _mm512_maskz_loadu_ps(mask, j->bias + p * NR) : _mm512_setzero_ps();
    for (int64_t r = 0; r < j->m; r++) {
        const __m512 y = _mm512_add_ps(_mm512_loadu_ps(ym + r * NR), bias);
        if (j->out_bf16) {
            const __m512i bits = _mm512_srli_epi32(vbf16_rounded_bits(y), 16);
            _mm256_mask_storeu_epi16((uint16_t *)j->out + r * j->n + p * NR, mask,
                                     _mm512_cvtepi32_epi16(bits));
        } else {
            _mm512_mask_storeu_ps((float *)j->out + r * j->n + p * NR, mask, y);
        }
    }
#else
    for (int64_t r = 0; r < j->m; r++)
        for (int jj = 0; jj < cols; jj++) {
            const int64_t o = p * NR + jj;
            const float y = ym[r * NR + jj] + (j->bias ? j->bias[o] : 0.0f);
            if (j->out_bf16) store_bf16((uint16_t *)j->out + r * j->n + o, y);
            else ((float *)j->out)[r * j->n + o] = y;
        }
#endif
}

/* ================================================================ int8 activations (x8)
 *
 * quant_gemm_x8 and quant_gemm_x8x2 multiply integer x: each row of x is quantized once per call,
 * per block of xb inputs (the largest multiple of 4 up to 32 that divides the group, so a block
 * lies within one group), symmetric, to Q = round(x * (L / amax)), sx = amax / L. A block's
 * products Q x code are summed exactly in int32 (vpdpbusd: 4 u8 x s8 products a lane, against
 * the float path's 2 per vdpbf16ps after converting every code), then added in float32 as
 *     y = fma(dot, scale_g * sx, y)                                  (no offsets)
 *     y = fma(fma(scale_g, dot, offset_g * sum(Q)), sx, y)           (offsets)
 * on every path (AVX-512 VNNI, AVX-VNNI, AVX2, portable), so they give the same bits, and a row's
 * bits depend on nothing but its own x (no tile shape, no other row).
 *
 * One pass (quant_gemm_x8, llama.cpp's numerics): L = 127, Q an int8. A block holding an outlier
 * (SmolLM2's activations reach 476) leaves the others a few levels or none.
 * Two passes (quant_gemm_x8x2): L = 32512 = 127 x 256, written Q = 255 q1 + q2 with
 * q1 = round(Q / 255) (no ties: 255 is odd) and q2 in [-127, 127]: q1 is a first pass at about
 * amax / 127, q2 its residual at 1/255 of that, found exactly in integers. Each weight vector
 * meets two vpdpbusd, one per plane of x, and dot = 255 dot1 + dot2 is exact (|dot| < 2^27), so
 * the block keeps one scale and the close above. |x - sx Q| <= sx / 2 (+ 3 2^-24 |x|, float32's
 * roundings): 2^-16 of the block's amax, below bf16's own rounding (2^-9 |x|) of every value
 * above amax / 127. A second scale from the residual's own amax would gain about a bit
 * (residuals fill +-s1 / 2 unless all tiny) for a float sum of two dots per block; 255 rather
 * than 256 keeps |q2| <= 127, which AVX2's vpmaddubsw needs (2 x 128 x 128 saturates) and
 * vpsignb too (-128 has no negation).
 * Cost: two vpdpbusd per 4 k are as many multiply instructions as the float path's two
 * vdpbf16ps, and Zen 5 issues both at the same rate, so from 16 rows two passes run at most as
 * fast as quant_gemm (0.75-1.3x measured: the blocks' closes are the difference), one pass
 * 1.2-2.1x.
 */
#define X8_TINY 0x1p-100f /* a block whose amax is below quantizes to 0 (L / amax overflows) */
#define X8_LEVELS(passes) ((passes) == 2 ? 32512.0f : 127.0f) /* L */
#define X8_ROWS(passes) ((passes) == 2 ? X8_MR2 : X8_MR) /* a tile's rows (the build's) */

static int64_t x_block(int64_t group) {
    int64_t b = 32;
    while (group % b) b -= 4;
    return b;
}

/* L / amax, or 0 where the block quantizes to 0 (tiny, or holding an inf or NaN) */
static float block_inv(float amax, int bad, float levels) {
    return bad || amax < X8_TINY ? 0.0f : levels / amax;
}

static void finish_block(xblock_t *b, float amax, int bad, int32_t qsum, float levels) {
    b->scale = bad ? NAN : amax < X8_TINY ? 0.0f : amax / levels; /* NaN: the outputs are NaN */
    b->qsum = (float)qsum; /* exact: |qsum| <= 32 x 32512 */
    b->corr = -128 * qsum;
    b->pad = 0;
}

/* Q's first pass, round(Q / 255): Q / 255 is at least 1/510 from a tie, the product's error
 * under 2^-16, so float32 finds it on every path */
static inline int32_t first_pass(int32_t q) { return (int32_t)nearbyintf((float)q * (1.0f / 255)); }

/* Int8 x laid out for the tiles: rows in sets of xset (a tile's rows), each set's inputs 4 at
 * a time (a quad, vpdpbusd's operand), every row's planes side by side:
 *     set: [k / 4][xset rows][passes][4 inputs]
 * so that a tile finds all its operands at fixed offsets from one pointer (with a pointer a row
 * and plane, 16 of them, gcc spilled them in the AVX-512 tile). */
static inline int64_t quad_bytes(const job_t *j) { return j->xset * j->passes * 4; }

/* row r's place: its first quad */
static inline int8_t *x8_row(const job_t *j, const int8_t *xq, int64_t r) {
    return (int8_t *)xq + (r / j->xset) * j->xset * j->passes * j->k + (r % j->xset) * j->passes * 4;
}

/* input i of plane p, from its row's place */
static inline int64_t x8_at(const job_t *j, int64_t i, int p) {
    return (i / 4) * quad_bytes(j) + p * 4 + i % 4;
}

/* row r of x -> its planes at q (its place) and its blocks (portable) */
static __attribute__((unused)) void quantize_row_scalar(const job_t *j, int64_t r, int x_bf16,
                                                         int8_t *q, xblock_t *b) {
    const float levels = X8_LEVELS(j->passes);
    for (int64_t i0 = 0; i0 < j->k; i0 += j->xb, b++) {
        float amax = 0.0f;
        int bad = 0;
        for (int64_t i = i0; i < i0 + j->xb; i++) {
            const float a = fabsf(x_at(j, r, i, x_bf16));
            bad |= !(a <= FLT_MAX);
            amax = a > amax ? a : amax;
        }
        const float inv = block_inv(amax, bad, levels);
        int32_t qsum = 0;
        for (int64_t i = i0; i < i0 + j->xb; i++) {
            const int32_t v = bad ? 0 : (int32_t)nearbyintf(x_at(j, r, i, x_bf16) * inv);
            const int32_t hi = j->passes == 2 ? first_pass(v) : v;
            q[x8_at(j, i, 0)] = (int8_t)hi;
            if (j->passes == 2) q[x8_at(j, i, 1)] = (int8_t)(v - 255 * hi);
            qsum += v;
        }
        finish_block(b, amax, bad, qsum, levels);
    }
}

/* where a panel's blocks find their scales (offsets): the index advances every group / xb
 * blocks, with no division per block (at one row a few divisions a chunk cost a fifth) */
typedef struct {
    int64_t at, left, per_group;
} tables_t;

static inline void next_block(tables_t *t) {
    if (--t->left == 0) {
        t->left = t->per_group;
        t->at += NR;
    }
}

/* one chunk of a panel on the x8 path: k in [k0, k0 + len), the rows from r0 (their outputs in
 * ym); blk: the chunk's first block, t: where its tables start */
typedef struct {
    int64_t p, k0, len, r0, blk;
    tables_t t;
    float *ym;
} xchunk_t;

static int code_int(const uint8_t *panel, int bits, int64_t kk, int jj) {
    if (bits == 8) return (int8_t)panel[(kk / 2) * 32 + 2 * jj + (kk & 1)];
    const uint8_t b = panel[(kk / 4) * 32 + 2 * jj + (kk & 1)];
    return (kk & 2) ? b >> 4 : b & 15;
}

/* a block's sums of one row into its outputs y (portable) */
static void close_x8_scalar(const job_t *j, int64_t at, const xblock_t *b, const int32_t *dot,
                            float *y) {
    for (int jj = 0; jj < NR; jj++) {
        const float scale = table_at(j, j->scales, at + jj);
        if (!j->offsets) {
            y[jj] = fmaf((float)dot[jj], scale * b->scale, y[jj]);
            continue;
        }
        const float t = fmaf(scale, (float)dot[jj], table_at(j, j->offsets, at + jj) * b->qsum);
        y[jj] = fmaf(t, b->scale, y[jj]);
    }
}

static __attribute__((unused)) void tile_x8_scalar(const job_t *j, const xchunk_t *c, int rows) {
    const uint8_t *panel = j->codes + c->p * panel_bytes(j);
    for (int r = 0; r < rows; r++) {
        const int8_t *x = x8_row(j, j->xq, c->r0 + r);
        const xblock_t *b = j->xblocks + (c->r0 + r) * j->nb + c->blk;
        tables_t t = c->t;
        for (int64_t s = c->k0; s < c->k0 + c->len; s += j->xb, b++, next_block(&t)) {
            int32_t dot[NR] = {0}, dot2[NR] = {0};
            for (int64_t kk = s; kk < s + j->xb; kk++)
                for (int jj = 0; jj < NR; jj++) {
                    const int code = code_int(panel, j->bits, kk, jj);
                    dot[jj] += x[x8_at(j, kk, 0)] * code;
                    if (j->passes == 2) dot2[jj] += x[x8_at(j, kk, 1)] * code;
                }
            for (int jj = 0; jj < NR; jj++) dot[jj] = j->passes == 2 ? 255 * dot[jj] + dot2[jj] : dot[jj];
            close_x8_scalar(j, t.at, b, dot, c->ym + r * NR);
        }
    }
}

/* ---------------------------------------------------------------- x8: AVX-512 VNNI */
#if defined(PAGEDSERVE_AVX512) && defined(__AVX512VNNI__)
#define X8_MR 8
#define X8_MR2 8 /* rows a tile with two passes: 16 sums in registers */
#define X8_PATH "avx512-vnni"

ALWAYS_INLINE __m512 load_x16(const job_t *j, int64_t r, int64_t i, __mmask16 mask, int x_bf16) {
    const int64_t at = r * j->x_stride + i;
    if (!x_bf16) return _mm512_maskz_loadu_ps(mask, (const float *)j->x + at);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)j->x + at);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* n of 16 Q of a block (a multiple of 4) as its planes' bytes at q (quantize_row_scalar's
 * places: a quad of each plane side by side, quads qs apart) */
ALWAYS_INLINE void store_planes_512(__m512i v, int8_t *q, int64_t qs, int n, const int P) {
    __m128i lo = _mm512_cvtsepi32_epi8(v), hi = lo;
    if (P == 2) {
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(1.0f / 255)));
        const __m128i b1 = _mm512_cvtsepi32_epi8(q1);
        const __m128i b2 = _mm512_cvtsepi32_epi8(_mm512_sub_epi32(v, _mm512_sub_epi32(_mm512_slli_epi32(q1, 8), q1)));
        lo = _mm_unpacklo_epi32(b1, b2), hi = _mm_unpackhi_epi32(b1, b2); /* quads 0, 1 | 2, 3 */
    }
#pragma GCC unroll 4
    for (int c = 0; c < n / 4; c++, q += qs) {
        if (P == 1) {
            _mm_storeu_si32(q, lo);
            lo = _mm_srli_si128(lo, 4);
            continue;
        }
        _mm_storel_epi64((__m128i *)q, lo);
        lo = _mm_alignr_epi8(hi, lo, 8), hi = _mm_srli_si128(hi, 8); /* the next quads first */
    }
}

/* quantize_row_scalar's values, a block (up to 32) in two masked vectors; XB: the block
 * where it is a constant (32), else 0 */
ALWAYS_INLINE void quantize_row_512(const job_t *j, int64_t r, int x_bf16, int8_t *q, xblock_t *b,
                                    const int XB, const int P) {
    const int64_t xb = XB ? XB : j->xb, qs = X8_ROWS(P) * P * 4;
    const int n0 = xb < 16 ? (int)xb : 16;
    const __mmask16 m0 = (__mmask16)((1u << n0) - 1), m1 = (__mmask16)((1u << (xb - n0)) - 1);
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    const float levels = X8_LEVELS(P);
    for (int64_t i0 = 0; i0 < j->k; i0 += xb, b++, q += xb / 4 * qs) {
        const __m512 v0 = load_x16(j, r, i0, m0, x_bf16), v1 = load_x16(j, r, i0 + 16, m1, x_bf16);
        const __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
        const int bad = (_mm512_cmp_ps_mask(a0, big, _CMP_NLE_UQ)
                         | _mm512_cmp_ps_mask(a1, big, _CMP_NLE_UQ)) != 0;
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        const __m512 inv = _mm512_set1_ps(block_inv(amax, bad, levels));
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)); /* to nearest even */
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        store_planes_512(q0, q, qs, n0, P);
        if (xb > 16) store_planes_512(q1, q + 4 * qs, qs, (int)xb - 16, P);
        finish_block(b, amax, bad, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)), levels);
    }
}

static void quantize_row(const job_t *j, int64_t r, int x_bf16, int8_t *q, xblock_t *b) {
    if (j->xb == 32 && j->passes == 2) quantize_row_512(j, r, x_bf16, q, b, 32, 2);
    else if (j->xb == 32) quantize_row_512(j, r, x_bf16, q, b, 32, 1);
    else if (j->passes == 2) quantize_row_512(j, r, x_bf16, q, b, 0, 2);
    else quantize_row_512(j, r, x_bf16, q, b, 0, 1);
}

/* vpermw: word 2j of a quad vector is word j of the k-pair block 2c, word 2j + 1 that of 2c + 1 */
static const uint16_t QUAD_WORDS[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* 4 k of a panel (src: their codes) as 16 lanes of 4 unsigned bytes, lane j output j's codes.
 * int8 codes become code + 128 (an xor): the block's sum starts at -128 sum(q) (its corr). int4:
 * lane j's word holds k, k + 1 in its low nibbles, k + 2, k + 3 in its high ones. */
ALWAYS_INLINE __m512i quads_512(const uint8_t *src, const int bits, __m512i words) {
    if (bits == 8) {
        const __m512i v = _mm512_permutexvar_epi16(words, _mm512_loadu_si512(src));
        return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    }
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    /* (w | w << 12) & 0x0f0f0f0f */
    return _mm512_ternarylogic_epi32(w, _mm512_slli_epi32(w, 12), _mm512_set1_epi32(0x0f0f0f0f), 0xa8);
}

/* acc + the lanes' u8 quads q times the s8 quad at x (all lanes) */
ALWAYS_INLINE __m512i dot_quad(__m512i acc, __m512i q, const int8_t *x) {
    int32_t four;
    memcpy(&four, x, sizeof four);
    return _mm512_dpbusd_epi32(acc, q, _mm512_set1_epi32(four));
}

/* the block's sums of the tile's rows (pass p: a[p][0] + .. + a[p][U - 1]; b: the first row's
 * block) into their outputs y */
ALWAYS_INLINE void close_x8_512(const job_t *j, int64_t at, const xblock_t *b,
                                __m512i (*a)[4][X8_MR], __m512 *y, const int R, const int U,
                                const int P) {
    const __m512 scale = load16_table(j, j->scales, at);
    const __m512 offset = j->offsets ? load16_table(j, j->offsets, at) : scale;
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m512i sum = a[0][0][r], sum2 = a[P - 1][0][r];
#pragma GCC unroll 4
        for (int u = 1; u < U; u++) {
            sum = _mm512_add_epi32(sum, a[0][u][r]);
            if (P == 2) sum2 = _mm512_add_epi32(sum2, a[1][u][r]);
        }
        if (P == 2) /* 255 dot1 + dot2 */
            sum = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(sum, 8), sum), sum2);
        const __m512 dot = _mm512_cvtepi32_ps(sum), sx = _mm512_set1_ps(b[r * j->nb].scale);
        if (!j->offsets) {
            y[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, sx), y[r]);
            continue;
        }
        const __m512 qo = _mm512_mul_ps(offset, _mm512_set1_ps(b[r * j->nb].qsum));
        y[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(scale, dot, qo), sx, y[r]);
    }
}

/* R rows of one chunk, the codes converted as they stream, each quad of codes multiplied by
 * the rows' P planes. A row sums U steps of 4 k apart (U = 4 at one row, 2 up to 4 rows), so
 * that enough vpdpbusd are in flight. XB: the block size where it is a constant (32, GGUF's),
 * else 0. int8 codes: the last plane's sums start at the block's corr (255 x a start would
 * not cancel) */
ALWAYS_INLINE void tile_x8_512(const job_t *j, const xchunk_t *c, const int R, const int bits,
                               const int XB, const int P) {
    const int U = R == 1 ? 4 : R <= 4 ? 2 : 1;
    const int64_t xb = XB ? XB : j->xb, step = NR * bits / 2; /* code bytes per 4 k */
    const int64_t qs = X8_MR * P * 4; /* x's bytes per 4 k (x8_row) */
    const uint8_t *w = j->codes + c->p * panel_bytes(j) + c->k0 * NR * bits / 8;
    const int8_t *x = x8_row(j, j->xq, c->r0) + c->k0 / 4 * qs;
    const xblock_t *b = j->xblocks + c->r0 * j->nb + c->blk;
    const __m512i words = _mm512_loadu_si512(QUAD_WORDS);
    tables_t t = c->t;
    __m512 y[X8_MR];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = _mm512_loadu_ps(c->ym + r * NR);
    for (int64_t s = 0; s < c->len; s += xb, b++, next_block(&t)) {
        __m512i a[2][4][X8_MR];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int u = 0; u < U; u++) {
                a[0][u][r] = a[P - 1][u][r] = _mm512_setzero_si512();
                if (u == 0 && bits == 8) a[P - 1][0][r] = _mm512_set1_epi32(b[r * j->nb].corr);
            }
        int64_t kk = 0;
#pragma GCC unroll 8
        for (; kk + 4 * U <= xb; kk += 4 * U, w += U * step, x += U * qs) {
#pragma GCC unroll 4
            for (int u = 0; u < U; u++) {
                if (bits == 8 || u % 2 == 0) _mm_prefetch((const char *)w + u * step + AHEAD, _MM_HINT_T0);
                const __m512i q = quads_512(w + u * step, bits, words);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++)
#pragma GCC unroll 2
                    for (int p = 0; p < P; p++)
                        a[p][u][r] = dot_quad(a[p][u][r], q, x + u * qs + (r * P + p) * 4);
            }
        }
        for (; kk < xb; kk += 4, w += step, x += qs) { /* a block of 4 (8 ..) k past the U steps */
            _mm_prefetch((const char *)w + AHEAD, _MM_HINT_T0);
            const __m512i q = quads_512(w, bits, words);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
#pragma GCC unroll 2
                for (int p = 0; p < P; p++) a[p][0][r] = dot_quad(a[p][0][r], q, x + (r * P + p) * 4);
        }
        close_x8_512(j, t.at, b, a, y, R, U, P);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_storeu_ps(c->ym + r * NR, y[r]);
}

#define X8_512(R, P) if (j->bits == 8 && j->xb == 32) tile_x8_512(j, c, R, 8, 32, P);          \
                     else if (j->bits == 8) tile_x8_512(j, c, R, 8, 0, P);                     \
                     else if (j->xb == 32) tile_x8_512(j, c, R, 4, 32, P);                     \
                     else tile_x8_512(j, c, R, 4, 0, P);
static void tile_x8(const job_t *j, const xchunk_t *c, int rows) {
#define X8(R) case R: if (j->passes == 2) { X8_512(R, 2) } else { X8_512(R, 1) } return;
    switch (rows) { X8(1) X8(2) X8(3) X8(4) X8(5) X8(6) X8(7) X8(8) }
#undef X8
}

/* ---------------------------------------------------------------- x8: AVX2, AVX-VNNI */
#elif defined(__AVX2__) && defined(__FMA__)
#define X8_MR 4 /* two sums a row, outputs 0-7 and 8-15; the outputs wait in memory */
#define X8_MR2 2 /* with two passes four sums a row: more rows would spill (16 registers) */
#ifdef __AVXVNNI__
#define X8_PATH "avx-vnni"
#else
#define X8_PATH "avx2"
#endif

ALWAYS_INLINE __m256i x_quad8(const int8_t *q) {
    int32_t four;
    memcpy(&four, q, sizeof four);
    return _mm256_set1_epi32(four);
}

ALWAYS_INLINE __m128 load_x4(const job_t *j, int64_t r, int64_t i, int x_bf16) {
    const int64_t at = r * j->x_stride + i;
    if (!x_bf16) return _mm_loadu_ps((const float *)j->x + at);
    const __m128i h = _mm_loadl_epi64((const __m128i *)((const uint16_t *)j->x + at));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}

ALWAYS_INLINE void store_bytes4(int8_t *q, __m128i v) {
    const int32_t four = _mm_cvtsi128_si32(_mm_packs_epi16(_mm_packs_epi32(v, v), v));
    memcpy(q, &four, sizeof four);
}

/* a quad of Q as its planes' bytes at q (store_planes_512's) */
ALWAYS_INLINE void store_planes4(const job_t *j, __m128i v, int8_t *q) {
    if (j->passes == 2) {
        const __m128i hi = _mm_cvtps_epi32(_mm_mul_ps(_mm_cvtepi32_ps(v), _mm_set1_ps(1.0f / 255)));
        store_bytes4(q + 4, _mm_sub_epi32(v, _mm_mullo_epi32(hi, _mm_set1_epi32(255))));
        v = hi;
    }
    store_bytes4(q, v);
}

/* quantize_row_scalar's values, 4 at a time */
static void quantize_row(const job_t *j, int64_t r, int x_bf16, int8_t *q, xblock_t *b) {
    const float levels = X8_LEVELS(j->passes);
    const __m128 sign = _mm_set1_ps(-0.0f), big = _mm_set1_ps(FLT_MAX);
    for (int64_t i0 = 0; i0 < j->k; i0 += j->xb, b++) {
        __m128 m = _mm_setzero_ps();
        int bad = 0;
        for (int64_t i = i0; i < i0 + j->xb; i += 4) {
            const __m128 a = _mm_andnot_ps(sign, load_x4(j, r, i, x_bf16));
            bad |= _mm_movemask_ps(_mm_cmp_ps(a, big, _CMP_NLE_UQ));
            m = _mm_max_ps(m, a);
        }
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const __m128 inv = _mm_set1_ps(block_inv(amax, bad, levels));
        __m128i sum = _mm_setzero_si128();
        for (int64_t i = i0; i < i0 + j->xb; i += 4) {
            const __m128i q4 = _mm_cvtps_epi32(_mm_mul_ps(load_x4(j, r, i, x_bf16), inv));
            store_planes4(j, q4, q + x8_at(j, i, 0));
            sum = _mm_add_epi32(sum, q4);
        }
        sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4e));
        sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xb1));
        finish_block(b, amax, bad, _mm_cvtsi128_si32(sum), levels);
    }
}

/* 4 k of a panel as outputs 0-7 (w[0]) and 8-15 (w[1]), a lane's 4 bytes its output's codes
 * (int8: as they are, signed) */
ALWAYS_INLINE void quads_avx2(const uint8_t *src, const int bits, __m256i *w) {
    if (bits == 8) { /* the two k-pair blocks' words interleaved, as QUAD_WORDS */
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)src);
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(src + 32));
        const __m256i lo = _mm256_unpacklo_epi16(b0, b1), hi = _mm256_unpackhi_epi16(b0, b1);
        w[0] = _mm256_permute2x128_si256(lo, hi, 0x20);
        w[1] = _mm256_permute2x128_si256(lo, hi, 0x31);
        return;
    }
    const __m256i low = _mm256_set1_epi32(0x0f0f0f0f);
    for (int h = 0; h < 2; h++) { /* as quads_512 */
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * h)));
        w[h] = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 12)), low);
    }
}

#ifdef __AVXVNNI__
#define X8_CORR 1 /* int8 codes go in as code + 128, as on AVX-512 */
/* the unsigned side of the products: int8 code + 128, int4 as it is */
ALWAYS_INLINE __m256i unsigned_side(__m256i w, const int bits) {
    return bits == 8 ? _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)) : w;
}
ALWAYS_INLINE __m256i dot_avx2(__m256i acc, __m256i w, __m256i u, __m256i xq, const int bits) {
    (void)w, (void)bits;
    return _mm256_dpbusd_avx_epi32(acc, u, xq);
}
#else
#define X8_CORR 0
/* vpmaddubsw saturates two products at 32767: int8 codes go in as |code| times q with the code's
 * sign (128 x 127 x 2 fits), int4 as they are (15 x 127 x 2) */
ALWAYS_INLINE __m256i unsigned_side(__m256i w, const int bits) {
    return bits == 8 ? _mm256_abs_epi8(w) : w;
}
ALWAYS_INLINE __m256i dot_avx2(__m256i acc, __m256i w, __m256i u, __m256i xq, const int bits) {
    const __m256i s = bits == 8 ? _mm256_sign_epi8(xq, w) : xq;
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

/* a block's sums of one row (acc[p]: pass p's outputs 0-7, 8-15) into its outputs y, as
 * close_x8_512 */
ALWAYS_INLINE void close_x8_avx2(const job_t *j, int64_t at, const xblock_t *b,
                                 __m256i (*acc)[2], float *y, const int P) {
    const __m256 sx = _mm256_set1_ps(b->scale);
    for (int h = 0; h < 2; h++) {
        __m256i sum = acc[0][h];
        if (P == 2) /* 255 dot1 + dot2 */
            sum = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(sum, 8), sum), acc[1][h]);
        const __m256 scale = load8_table(j, j->scales, at + 8 * h), dot = _mm256_cvtepi32_ps(sum);
        __m256 t;
        if (j->offsets) {
            const __m256 qo = _mm256_mul_ps(load8_table(j, j->offsets, at + 8 * h), _mm256_set1_ps(b->qsum));
            t = _mm256_fmadd_ps(_mm256_fmadd_ps(scale, dot, qo), sx, _mm256_loadu_ps(y + 8 * h));
        } else {
            t = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, sx), _mm256_loadu_ps(y + 8 * h));
        }
        _mm256_storeu_ps(y + 8 * h, t);
    }
}

/* R rows of one chunk, each quad of codes times the rows' P planes (as tile_x8_512) */
ALWAYS_INLINE void tile_x8_avx2(const job_t *j, const xchunk_t *c, const int R, const int bits,
                                const int P) {
    const int64_t step = NR * bits / 2, qs = X8_ROWS(P) * P * 4; /* bytes per 4 k: codes, x */
    const uint8_t *w = j->codes + c->p * panel_bytes(j) + c->k0 * NR * bits / 8;
    const int8_t *x = x8_row(j, j->xq, c->r0) + c->k0 / 4 * qs;
    const xblock_t *b = j->xblocks + c->r0 * j->nb + c->blk;
    tables_t t = c->t;
    for (int64_t s = 0; s < c->len; s += j->xb, b++, next_block(&t)) {
        __m256i acc[X8_MR][2][2];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            acc[r][0][0] = acc[r][0][1] = _mm256_setzero_si256();
            acc[r][P - 1][0] = acc[r][P - 1][1] = _mm256_set1_epi32(X8_CORR && bits == 8 ? b[r * j->nb].corr : 0);
        }
        for (int64_t kk = 0; kk < j->xb; kk += 4, w += step, x += qs) {
            _mm_prefetch((const char *)w + AHEAD, _MM_HINT_T0);
            __m256i q[2];
            quads_avx2(w, bits, q);
            const __m256i u0 = unsigned_side(q[0], bits), u1 = unsigned_side(q[1], bits);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
#pragma GCC unroll 2
                for (int p = 0; p < P; p++) {
                    const __m256i xq = x_quad8(x + (r * P + p) * 4);
                    acc[r][p][0] = dot_avx2(acc[r][p][0], q[0], u0, xq, bits);
                    acc[r][p][1] = dot_avx2(acc[r][p][1], q[1], u1, xq, bits);
                }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) close_x8_avx2(j, t.at, b + r * j->nb, acc[r], c->ym + r * NR, P);
    }
}

static void tile_x8(const job_t *j, const xchunk_t *c, int rows) {
#define X8(R, P) case R: if (j->bits == 8) tile_x8_avx2(j, c, R, 8, P);                        \
                         else tile_x8_avx2(j, c, R, 4, P);                                     \
                         return;
    if (j->passes == 2) {
        switch (rows) { X8(1, 2) X8(2, 2) }
    }
    switch (rows) { X8(1, 1) X8(2, 1) X8(3, 1) X8(4, 1) }
#undef X8
}

/* ---------------------------------------------------------------- x8: portable */
#else
#define X8_MR 4
#define X8_MR2 4
#define X8_PATH "scalar"
#define quantize_row quantize_row_scalar
#define tile_x8 tile_x8_scalar
#endif

/* a panel in chunks of whole blocks, up to CHUNK of k, each through tiles of up to xset rows */
static void one_panel_x8(const job_t *j, int64_t p, float *ym) {
    memset(ym, 0, j->m * NR * sizeof(float));
    const int64_t per_group = j->group / j->xb, chunk_blocks = CHUNK / j->xb, mr = j->xset;
    xchunk_t c = {p, 0, 0, 0, 0, {p * (j->k / j->group) * NR, per_group, per_group}, ym};
    for (; c.k0 < j->k; c.k0 += c.len, c.blk += chunk_blocks) {
        c.len = j->k - c.k0 < chunk_blocks * j->xb ? j->k - c.k0 : chunk_blocks * j->xb;
        for (c.r0 = 0; c.r0 < j->m; c.r0 += mr) {
            c.ym = ym + c.r0 * NR;
            tile_x8(j, &c, j->m - c.r0 < mr ? (int)(j->m - c.r0) : (int)mr);
        }
        for (int64_t i = 0; i < chunk_blocks; i++) next_block(&c.t);
    }
    store_outputs(j, p, ym);
}

/* every row of x as int8 (x8_row's sets, after its blocks [m][nb]): one allocation, NULL when
 * out of memory */
static xblock_t *quantize_x(job_t *j, int x_bf16, int threads) {
    j->xset = X8_ROWS(j->passes);
    const int64_t sets = (j->m + j->xset - 1) / j->xset;
    xblock_t *b = malloc(j->m * j->nb * sizeof(xblock_t) + sets * j->xset * j->passes * j->k);
    if (!b) return 0;
    int8_t *q = (int8_t *)(b + j->m * j->nb);
    _Pragma("omp parallel for if(j->m * j->k >= (1 << 18)) num_threads(threads)")
    for (int64_t r = 0; r < j->m; r++) quantize_row(j, r, x_bf16, x8_row(j, q, r), b + r * j->nb);
    j->xq = q;
    j->xblocks = b;
    return b;
}

/* whether tiles read the codes themselves (see tile_bf16_512) rather than a decoded buffer */
static int direct(const job_t *j, int x_bf16) {
    (void)j, (void)x_bf16;
#if defined(HAVE_BF16_DOT)
    if (x_bf16) return j->bits == 4 || j->m <= DIRECT_INT8_ROWS;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (!x_bf16) return j->m <= DIRECT_AVX2_ROWS;
#endif
    return 0;
}

static void one_panel(const job_t *j, int64_t p, void *buf, float *accm, float *ym, int x_bf16) {
    memset(ym, 0, j->m * NR * sizeof(float));
    const int codes_in_tile = direct(j, x_bf16);
    for (int64_t k0 = 0; k0 < j->k;) {
        chunk_t c = {p, k0, chunk_len(j, k0), 0, accm, ym};
        if (!codes_in_tile) decode(j, &c, buf, x_bf16);
        for (int64_t r0 = 0; r0 < j->m; r0 += MR) {
            chunk_t t = {p, k0, c.len, r0, accm + r0 * NR, ym + r0 * NR};
            const int rows = j->m - r0 < MR ? (int)(j->m - r0) : MR;
#if defined(HAVE_BF16_DOT)
            if (codes_in_tile && x_bf16) { tile_bf16_direct(j, &t, rows); continue; }
#endif
#if defined(__AVX2__) && defined(__FMA__)
            if (codes_in_tile) { tile_avx2_direct(j, &t, rows); continue; }
#endif
            tile(j, &t, buf, rows, x_bf16);
        }
        k0 += c.len;
    }
    store_outputs(j, p, ym);
}

/* sum(x_g) per row and group, for the offsets */
static float *group_sums(const job_t *j, int x_bf16, int threads) {
    const int64_t groups = j->k / j->group;
    float *xsum = malloc(j->m * groups * sizeof(float));
    if (!xsum) return 0;
    /* a decode step's few rows: summed on this thread (a parallel region costs more) */
    _Pragma("omp parallel for if(j->m * j->k >= (1 << 18)) num_threads(threads)")
    for (int64_t r = 0; r < j->m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t i = g * j->group; i < (g + 1) * j->group; i++) s += x_at(j, r, i, x_bf16);
            xsum[r * groups + g] = s;
        }
    return xsum;
}

/* bit 0: bf16 x is multiplied as it is (AVX-512 BF16); else the caller widens it to float32 */
int quant_gemm_features(void) {
#if defined(HAVE_BF16_DOT)
    return 1;
#else
    return 0;
#endif
}

/* which tile this build runs: "avx512-bf16", "avx512", "avx2" or "scalar" */
const char *quant_gemm_path(void) {
#if defined(HAVE_BF16_DOT)
    return "avx512-bf16";
#elif defined(PAGEDSERVE_AVX512)
    return "avx512";
#elif defined(PAGEDSERVE_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

/* which tiles quant_gemm_x8 and quant_gemm_x8x2 run: "avx512-vnni", "avx-vnni", "avx2" or
 * "scalar" */
const char *quant_gemm_x8_path(void) { return X8_PATH; }

/* all panels times the job's rows, shared out over the threads; 0, or -1 when out of memory */
static int all_panels(const job_t *j, int x_bf16, int num_threads) {
    const int64_t panels = (j->n + NR - 1) / NR, m = j->m;
    int failed = 0;
    _Pragma("omp parallel num_threads(num_threads) reduction(|:failed)") {
        float *buf = aligned_alloc(64, CHUNK * NR * sizeof(float));
        float *scratch = aligned_alloc(64, 2 * m * NR * sizeof(float)); /* a multiple of 64 */
        failed = !buf || !scratch;
        /* guided: a thread's first share is the remaining panels over the threads, and the
           shares shrink to LAST_RUN panels at the end. So each thread streams about one
           contiguous range of codes, which its prefetch runs on through (shares of 64 KiB
           taken in turn had each thread jump at every share, its prefetch wasted on the
           other's panels: 1.3-1.6x slower at one row, 9-43 GB/s against 15-66 on SmolLM2's
           weights, Zen 5, 2 threads), and a thread slowed down still leaves the small last
           shares to the others */
        _Pragma("omp for schedule(guided, LAST_RUN)")
        for (int64_t p = 0; p < panels; p++)
            if (failed) continue;
            else if (j->xq) one_panel_x8(j, p, scratch + m * NR);
            else one_panel(j, p, buf, scratch, scratch + m * NR, x_bf16);
        free(buf);
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* out [m, n] (float32, or bf16 when out_bf16) = x [m, k] (rows x_stride apart) times the packed
 * weight (scales and offsets float16 when half_scales, else float32), + bias (NULL: none), through
 * x quantized in `passes` int8 passes (1 or 2, see the x8 path), else (0) float x (bf16 only
 * where quant_gemm_features() says so).
 * k and group are multiples of 4, group divides k. Returns 0, or -1 when out of memory.
 *
 * Many rows go through in blocks whose outputs stay in L2 (a panel writes a strip 16 outputs
 * wide down every row): unblocked, 512 rows x 3072 outputs ran at half the rate per multiply of
 * 512 x 576. Blocks keep at least ROW_BLOCK_MIN rows, so a decode batch streams the weights once. */
static int gemm(job_t j, int x_bf16, int num_threads, int passes) {
    const int x8 = passes > 0;
    if (x_bf16 && !x8 && !quant_gemm_features()) return -1;
    if (j.m <= 0) return 0;
    j.xb = x_block(j.group);
    j.nb = j.k / j.xb;
    j.passes = passes;
    void *held = x8 ? (void *)quantize_x(&j, x_bf16, num_threads)
                    : j.offsets ? (void *)group_sums(&j, x_bf16, num_threads) : 0;
    if (!held && (x8 || j.offsets)) return -1;
    if (!x8) j.xsum = held;
    const int64_t x_size = x_bf16 ? 2 : 4, out_size = j.out_bf16 ? 2 : 4;
    const int64_t groups = j.k / j.group;
    int64_t block = OUT_BLOCK_BYTES / (j.n * out_size);
    /* a multiple of the tiles' rows (x8: of every xset, so x8_row finds the block's rows) */
    block = block < ROW_BLOCK_MIN ? ROW_BLOCK_MIN : block - block % (x8 ? 8 : MR);
    int failed = 0;
    for (int64_t r = 0; r < j.m && !failed; r += block) {
        job_t b = j;
        b.x = (const char *)j.x + r * j.x_stride * x_size;
        b.out = (char *)j.out + r * j.n * out_size;
        b.xsum = j.xsum ? j.xsum + r * groups : 0;
        b.xq = j.xq ? x8_row(&j, j.xq, r) : 0;
        b.xblocks = j.xblocks ? j.xblocks + r * j.nb : 0;
        b.m = j.m - r < block ? j.m - r : block;
        failed = all_panels(&b, x_bf16, num_threads);
    }
    free(held);
    return failed;
}

#define JOB_OF_ARGS {x, x_stride, m, n, k, group, codes, scales, offsets, 0, bias, out, out_bf16,  \
                     bits, half_scales, 0, 0, 0, 0, 0, 0}

/* float x: sums of x times each code in float32 */
int quant_gemm(const void *x, int64_t x_stride, int x_bf16, const uint8_t *codes,
               const void *scales, const void *offsets, int half_scales, const float *bias,
               void *out, int out_bf16, int64_t m, int64_t n, int64_t k, int64_t group, int bits,
               int num_threads) {
    return gemm((job_t)JOB_OF_ARGS, x_bf16, num_threads, 0);
}

/* int8 x in one pass (the x8 path, llama.cpp's numerics), bf16 x on any build: quant_gemm's
 * arguments and layout */
int quant_gemm_x8(const void *x, int64_t x_stride, int x_bf16, const uint8_t *codes,
                  const void *scales, const void *offsets, int half_scales, const float *bias,
                  void *out, int out_bf16, int64_t m, int64_t n, int64_t k, int64_t group,
                  int bits, int num_threads) {
    return gemm((job_t)JOB_OF_ARGS, x_bf16, num_threads, 1);
}

/* x in two int8 passes (a value and its residual: 2^-16 of a block's largest), as quant_gemm_x8 */
int quant_gemm_x8x2(const void *x, int64_t x_stride, int x_bf16, const uint8_t *codes,
                    const void *scales, const void *offsets, int half_scales, const float *bias,
                    void *out, int out_bf16, int64_t m, int64_t n, int64_t k, int64_t group,
                    int bits, int num_threads) {
    return gemm((job_t)JOB_OF_ARGS, x_bf16, num_threads, 2);
}
