/* y = x W^T (+ bias) in float32 through weight panels, on CPUs with AVX2 and FMA but no AVX-512
 * (Zen 3 and older, many Intel client parts: there bf16 is emulated, so the engine runs float32).
 *
 * The weights live in panels of 16 output rows, each panel [K][16] contiguous, so a thread reads
 * its panels front to back while up to 6 rows of x times the panel's 16 columns accumulate in 12
 * vector registers. With a handful of rows (decode) the GEMM is a stream of the weights, which
 * oneDNN's float32 kernels read at a third to a half of memory speed at M = 4..32 on a Zen 3; with
 * many (prompts) the 6 x 16 tile keeps both FMA units busy, 15-20% ahead of oneDNN there. Panels
 * are shared out over torch's OpenMP threads (see paged_decode.c), each output sums its K products
 * in order (the float32 reordering bound of executor/layers/cpu_gemm covers it).
 *
 * Panels can also hold bf16: a weight whose every value is a bf16 (a bf16 checkpoint computed in
 * float32, as most are) loses nothing there, and a decode step then reads half the bytes. The
 * tile widens each bf16 to its float32 in registers, so the sums are the float32 panels' exactly.
 */
#include <stdint.h>

#include "tile_rows.h"

#define NR 16 /* outputs per panel */
#define MR 6  /* rows of x per tile */
#define AHEAD_MAX_PASSES 4 /* see panel_gemm_f32 */

/* packed[p][k][j] = w[16 p + j][k]; rows past n are zero. */
#define DEFINE_PACK(NAME, T)                                                                    \
void NAME(const T *w, int64_t n, int64_t k, T *packed) {                                       \
    const int64_t panels = (n + NR - 1) / NR;                                                   \
    for (int64_t p = 0; p < panels; p++)                                                        \
        for (int j = 0; j < NR; j++) {                                                          \
            const int64_t row = p * NR + j;                                                     \
            for (int64_t kk = 0; kk < k; kk++)                                                  \
                packed[(p * k + kk) * NR + j] = row < n ? w[row * k + kk] : 0;                  \
        }                                                                                       \
}
DEFINE_PACK(pack_panels_f32, float)
DEFINE_PACK(pack_panels_bf16, uint16_t) /* bf16 bit patterns, moved as they are */

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>

int panel_gemm_available(void) { return 1; }

/* one output row of a tile: 16 sums (+ bias), the first `cols` of them stored */
static inline void store_row(__m256 lo, __m256 hi, const float *bias, float *out, int cols) {
    float y[NR];
    _mm256_storeu_ps(y, lo);
    _mm256_storeu_ps(y + 8, hi);
    for (int j = 0; j < cols; j++) out[j] = bias ? y[j] + bias[j] : y[j];
}

/* accumulators: a pair of named variables per row (tile_rows.h) */
#define ZERO(r) __m256 lo##r = _mm256_setzero_ps(), hi##r = _mm256_setzero_ps();
#define FMA(r) {                                                                                \
        const __m256 b = _mm256_broadcast_ss(x + r * x_stride + kk);                            \
        lo##r = _mm256_fmadd_ps(b, w0, lo##r);                                                  \
        hi##r = _mm256_fmadd_ps(b, w1, hi##r);                                                  \
    }
#define STORE(r) store_row(lo##r, hi##r, bias, out + r * out_stride, cols);

/* the 16 weights of a panel row as two vectors of 8 float32 */
static inline void wload_f32(const float *row, __m256 *w0, __m256 *w1) {
    *w0 = _mm256_loadu_ps(row);
    *w1 = _mm256_loadu_ps(row + 8);
}
static inline void wload_bf16(const uint16_t *row, __m256 *w0, __m256 *w1) {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)row));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 8)));
    *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    *w1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
}

/* rows x[0..R) (x_stride apart) times one panel of weights WT: out[r][0..cols) (+ bias[0..cols));
 * step kk prefetches the line at pf + kk * pf_step / 256 bytes */
#define DEFINE_TILE(R, WT, W)                                                                   \
static void tile_##W##_##R(const float *x, int64_t x_stride, const WT *panel, int64_t k,       \
                           const float *bias, float *out, int64_t out_stride, int cols,        \
                           const char *pf, int64_t pf_step) {                                  \
    ROWS_##R(ZERO)                                                                              \
    for (int64_t kk = 0; kk < k; kk++) {                                                        \
        _mm_prefetch(pf + ((kk * pf_step) >> 8), _MM_HINT_T0);                                 \
        __m256 w0, w1;                                                                          \
        wload_##W(panel + kk * NR, &w0, &w1);                                                   \
        ROWS_##R(FMA)                                                                           \
    }                                                                                           \
    ROWS_##R(STORE)                                                                             \
}
#define DEFINE_TILES(WT, W)                                                                     \
    DEFINE_TILE(1, WT, W) DEFINE_TILE(2, WT, W) DEFINE_TILE(3, WT, W)                           \
    DEFINE_TILE(4, WT, W) DEFINE_TILE(5, WT, W) DEFINE_TILE(6, WT, W)                           \
    typedef void (*tile_##W##_fn)(const float *, int64_t, const WT *, int64_t, const float *,  \
                                  float *, int64_t, int, const char *, int64_t);              \
    static const tile_##W##_fn TILES_##W[MR + 1] = {0, tile_##W##_1, tile_##W##_2,              \
        tile_##W##_3, tile_##W##_4, tile_##W##_5, tile_##W##_6};
DEFINE_TILES(float, f32)
DEFINE_TILES(uint16_t, bf16)

/* out [m, n] (rows n apart) = x [m, k] (rows x_stride apart) times the packed weight (float32
 * panels, or bf16 ones: panel_gemm_f32_bf16_panels), + bias (NULL: none). Each panel is read from
 * memory once per block of rows and serves every row of the block from cache.
 *
 * Prefetch: a panel worked on in one pass (m <= 6) streams itself, each step fetching its line 32
 * steps ahead; so does one worked on in many (compute-bound). One worked on in 2-4 passes would
 * stall on memory in its first pass and leave the memory idle in the others, so all its passes
 * fetch the next panel instead, spread over them: over the model's weights 10-22% faster at 12-24
 * rows on a Zen 3, 2-7% at 8, the same elsewhere. */
#define DEFINE_PANELS_TIMES_ROWS(NAME, WT, W)                                                   \
static void NAME(const float *x, int64_t x_stride, const WT *packed, const float *bias,        \
                 float *out, int64_t m, int64_t n, int64_t k, int num_threads) {               \
    const int64_t panels = (n + NR - 1) / NR, row_bytes = NR * (int64_t)sizeof(WT);             \
    /* guided shares, as quant_gemm.c's all_panels says why: about one contiguous range per     \
       thread, shrinking to 2 panels at the end (chunks of 4 taken in turn were 1.1-1.5x        \
       slower at 1 and 16 rows in this file too: docs/benchmarks.md) */                         \
    _Pragma("omp parallel for schedule(guided, 2) num_threads(num_threads)")                    \
    for (int64_t p = 0; p < panels; p++) {                                                      \
        const int cols = n - p * NR < NR ? (int)(n - p * NR) : NR;                              \
        const WT *panel = packed + p * k * NR;                                                  \
        const int64_t passes = (m + MR - 1) / MR;                                               \
        const int ahead = passes >= 2 && passes <= AHEAD_MAX_PASSES && p + 1 < panels;          \
        /* bytes per step, in 1/256: a row each, or the next panel's k rows over the passes */  \
        const int64_t step = ahead ? row_bytes * 256 / passes : row_bytes * 256;                \
        for (int64_t r = 0, pass = 0; r < m; r += MR, pass++) {                                 \
            const int rows = m - r < MR ? (int)(m - r) : MR;                                    \
            const char *pf = ahead ? (const char *)(panel + k * NR) + pass * k * row_bytes / passes \
                                   : (const char *)(panel + 32 * NR);                           \
            TILES_##W[rows](x + r * x_stride, x_stride, panel, k, bias ? bias + p * NR : 0,     \
                            out + r * n + p * NR, n, cols, pf, step);                           \
        }                                                                                       \
    }                                                                                           \
}
DEFINE_PANELS_TIMES_ROWS(panels_times_rows_f32, float, f32)
DEFINE_PANELS_TIMES_ROWS(panels_times_rows_bf16, uint16_t, bf16)

/* Every panel streams the whole of x past its tile, so x is taken in blocks of rows that stay in
 * the last-level cache (8 MiB of it): at 4096-8192 rows x 2048 unblocked, a Zen 3 lost a fifth to
 * a third of the rate. */
#define ROW_BLOCK_BYTES (8 << 20)
#define DEFINE_PANEL_GEMM(NAME, WT, W)                                                          \
void NAME(const float *x, int64_t x_stride, const WT *packed, const float *bias, float *out,    \
          int64_t m, int64_t n, int64_t k, int num_threads) {                                  \
    int64_t block = ROW_BLOCK_BYTES / (k * (int64_t)sizeof(float));                             \
    block = block < MR ? MR : block - block % MR;                                               \
    for (int64_t r = 0; r < m; r += block)                                                      \
        panels_times_rows_##W(x + r * x_stride, x_stride, packed, bias, out + r * n,            \
                              m - r < block ? m - r : block, n, k, num_threads);               \
}
DEFINE_PANEL_GEMM(panel_gemm_f32, float, f32)
DEFINE_PANEL_GEMM(panel_gemm_f32_bf16_panels, uint16_t, bf16)
#else
/* elsewhere oneDNN's own kernels are used (AVX-512 parts run them well, and this file has no
 * tile for them) */
int panel_gemm_available(void) { return 0; }
#endif
