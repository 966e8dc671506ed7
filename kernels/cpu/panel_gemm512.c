/* y = x W^T (+ bias) for bf16 weights on AVX-512 CPUs, with float32 FMAs instead of vdpbf16ps.
 *
 * Why: on an Intel Xeon whose AMX is hidden (a common cloud VM), vdpbf16ps does half the work per
 * cycle of a float32 FMA (measured: 90 against 182 GFLOP/s a core), so oneDNN's bf16 GEMMs, which
 * use it, run at half the core's speed. Widening each bf16 weight to its float32 in registers
 * costs two instructions per 32 weights, and the FMAs then run at full rate. On a Zen 4 or 5
 * vdpbf16ps is the faster one and this file is not used (the probe below decides).
 *
 * Panels hold 32 outputs in pairs: the 32-bit word j of panel row kk holds output j's weight in
 * its low half and output 16 + j's in its high half. Shifting the word left by 16 gives output j
 * as a float32, masking its low half off gives output 16 + j, so a 64-byte row becomes two
 * vectors of 16 float32 in two instructions. A tile of up to 12 rows of x times one panel keeps
 * 24 accumulators; each output sums its K products in order, in float32 (a bf16 x bf16 product is
 * exact there), and is rounded to bf16 once at the end.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tile_rows.h"

#define NR 32 /* outputs per panel */
#define MR 12 /* rows of x per tile */
#define ROW_BLOCK_BYTES (1 << 20) /* x taken in blocks of rows that stay in cache */

#if defined(__AVX512F__)
#include <immintrin.h>

int panel_gemm512_available(void) { return 1; }

/* round-to-nearest-even float32 -> bf16 of 16 values (NaN stays NaN), without AVX512_BF16 */
static inline __m256i to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* one row of a tile: 32 sums (+ bias), the first `cols` stored as bf16 */
static inline void store_row(__m512 lo, __m512 hi, const float *bias, uint16_t *out, int cols) {
    const __mmask16 mlo = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    const __mmask16 mhi = cols <= 16 ? 0 : cols >= 32 ? 0xffff : (__mmask16)((1u << (cols - 16)) - 1);
    if (bias) {
        lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(mlo, bias));
        hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(mhi, bias + 16));
    }
    _mm256_mask_storeu_epi16(out, mlo, to_bf16(lo));
    _mm256_mask_storeu_epi16(out + 16, mhi, to_bf16(hi));
}

/* accumulators: a pair of named variables per row (tile_rows.h) */
#define ZERO(r) __m512 lo##r = _mm512_setzero_ps(), hi##r = _mm512_setzero_ps();
#define FMA(r) {                                                                                \
        const __m512 b = _mm512_set1_ps(x[r * x_stride + kk]);                                  \
        lo##r = _mm512_fmadd_ps(b, wlo, lo##r);                                                 \
        hi##r = _mm512_fmadd_ps(b, whi, hi##r);                                                 \
    }
#define STORE(r) store_row(lo##r, hi##r, bias, out + r * out_stride, cols);

/* rows x[0..R) (float32, x_stride apart) times one panel: out[r][0..cols) as bf16 */
#define DEFINE_TILE(R)                                                                          \
static void tile_##R(const float *x, int64_t x_stride, const uint32_t *panel, int64_t k,       \
                     const float *bias, uint16_t *out, int64_t out_stride, int cols) {         \
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);                                  \
    ROWS_##R(ZERO)                                                                              \
    for (int64_t kk = 0; kk < k; kk++) {                                                        \
        _mm_prefetch((const char *)(panel + (kk + 16) * 16), _MM_HINT_T0);                     \
        const __m512i pair = _mm512_loadu_si512(panel + kk * 16);                               \
        const __m512 wlo = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));                    \
        const __m512 whi = _mm512_castsi512_ps(_mm512_and_si512(pair, high));                   \
        ROWS_##R(FMA)                                                                           \
    }                                                                                           \
    ROWS_##R(STORE)                                                                             \
}
DEFINE_TILE(1) DEFINE_TILE(2) DEFINE_TILE(3) DEFINE_TILE(4) DEFINE_TILE(5) DEFINE_TILE(6)
DEFINE_TILE(7) DEFINE_TILE(8) DEFINE_TILE(9) DEFINE_TILE(10) DEFINE_TILE(11) DEFINE_TILE(12)
typedef void (*tile_fn)(const float *, int64_t, const uint32_t *, int64_t, const float *,
                        uint16_t *, int64_t, int);
static const tile_fn TILES[MR + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
                                      tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

/* Each panel serves every row of the block from cache; panels are shared out in guided shares
 * (about one contiguous range per thread: quant_gemm.c's all_panels says why). */
static void panels_times_rows(const float *x, int64_t x_stride, const uint32_t *packed,
                              const float *bias, uint16_t *out, int64_t m, int64_t n, int64_t k,
                              int num_threads) {
    const int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for schedule(guided, 1) num_threads(num_threads)
    for (int64_t p = 0; p < panels; p++) {
        const int cols = n - p * NR < NR ? (int)(n - p * NR) : NR;
        for (int64_t r = 0; r < m; r += MR) {
            const int rows = m - r < MR ? (int)(m - r) : MR;
            TILES[rows](x + r * x_stride, x_stride, packed + p * k * 16, k,
                        bias ? bias + p * NR : 0, out + r * n + p * NR, n, cols);
        }
    }
}

/* out [m, n] bf16 = x [m, k] float32 (rows x_stride apart) times the paired panels + bias */
void panel_gemm512_bf16(const float *x, int64_t x_stride, const uint32_t *packed,
                        const float *bias, uint16_t *out, int64_t m, int64_t n, int64_t k,
                        int num_threads) {
    int64_t block = ROW_BLOCK_BYTES / (k * (int64_t)sizeof(float));
    block = block < MR ? MR : block - block % MR;
    for (int64_t r = 0; r < m; r += block)
        panels_times_rows(x + r * x_stride, x_stride, packed, bias, out + r * n,
                          m - r < block ? m - r : block, n, k, num_threads);
}

/* the same for bf16 x (the C layer loop's activations): x widened into a scratch buffer first;
 * 0, or -1 where the buffer could not be allocated */
int panel_gemm512_bf16_x(const uint16_t *x, int64_t x_stride, const uint32_t *packed,
                         const float *bias, uint16_t *out, int64_t m, int64_t n, int64_t k,
                         int num_threads) {
    float *xf = malloc((size_t)(m * k) * sizeof(float));
    if (!xf) return -1;
    for (int64_t r = 0; r < m; r++)
        for (int64_t kk = 0; kk < k; kk++) {
            const uint32_t bits = (uint32_t)x[r * x_stride + kk] << 16;
            memcpy(xf + r * k + kk, &bits, sizeof(float));
        }
    panel_gemm512_bf16(xf, k, packed, bias, out, m, n, k, num_threads);
    free(xf);
    return 0;
}

/* GFLOP/s of one thread issuing independent vdpbf16ps, and float32 FMAs: the probe that decides
 * whether this file's path is the faster one on this core (about a millisecond each). Twelve
 * chains cover two pipes times their latency; the operands are hidden from the optimiser. */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define PROBE_ITERS 100000
#define CHAIN(i) __m512 a##i = _mm512_set1_ps(0.001f * i);
#define SUM(i) s = _mm512_add_ps(s, a##i);
static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
#define DEFINE_PROBE(NAME, T, B, C, STEP, FLOPS)                                                \
double NAME(void) {                                                                             \
    CHAINS(CHAIN)                                                                               \
    T b = (B), c = (C);                                                                         \
    __asm__ volatile("" : "+v"(b), "+v"(c));                                                    \
    const double start = seconds();                                                             \
    for (long i = 0; i < PROBE_ITERS; i++) { CHAINS(STEP) }                                     \
    const double spent = seconds() - start;                                                     \
    __m512 s = _mm512_setzero_ps();                                                             \
    CHAINS(SUM)                                                                                 \
    volatile float sink = _mm512_reduce_add_ps(s);                                              \
    (void)sink;                                                                                 \
    return PROBE_ITERS * 12.0 * (FLOPS) / spent / 1e9;                                          \
}
#define FMA_STEP(i) a##i = _mm512_fmadd_ps(b, c, a##i);
DEFINE_PROBE(panel_gemm512_fma_gflops, __m512, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-7f),
             FMA_STEP, 32)
#if defined(__AVX512BF16__)
#define DP_STEP(i) a##i = _mm512_dpbf16_ps(a##i, b, c);
DEFINE_PROBE(panel_gemm512_dpbf16_gflops, __m512bh, (__m512bh)_mm512_set1_epi16(0x3f80),
             (__m512bh)_mm512_set1_epi16(0x3380), DP_STEP, 64)
#else
double panel_gemm512_dpbf16_gflops(void) { return 0; }
#endif
#else /* no AVX-512: the path is never taken, and the probe says so */
int panel_gemm512_available(void) { return 0; }
double panel_gemm512_fma_gflops(void) { return 0; }
double panel_gemm512_dpbf16_gflops(void) { return 0; }
#endif
