/* Paged attention for decode rows (one query per sequence) on the CPU, straight from the pages.
 *
 * The semantics are kernels/reference/attention.py's, restricted to sequences whose query is the
 * last position of their context. What this file adds is speed: no gathered copy of the context,
 * K/V read once each from the pages in order (a page holds [block_size, kv_heads, head_dim]
 * contiguously, so a token's heads are one stretch of memory), every query head of a KV head served
 * by the same K/V row, scores and accumulation in float32. Slots outside a context are never read.
 *
 * Built at run time by kernels/cpu/build.py (gcc -O3 -march=native -fopenmp) and called through
 * ctypes. The sequences run on OpenMP threads: torch has loaded its libgomp by then, and the library
 * shares it (same soname), so the work lands on torch's own worker threads. Those spin for a while
 * after each of torch's parallel regions; threads of our own would compete with them for the cores
 * (measured: decode attention twice as slow between matmuls). The compiler's target picks the path: AVX-512 (16 lanes), else AVX2 with FMA (8 lanes), else a
 * portable loop; all three compute the same thing and are tested against the same reference.
 *
 * The cache may be narrower than q and out (--kv-cache-dtype): bf16 under float32 queries, or fp8
 * e4m3 whose stored values mean stored * k_scale (v_scale). Each K/V row is widened to float32 as
 * it is loaded (simd.h; the SIMD paths read e4m3 divided by 2^8); k_scale (and that 2^8) is
 * folded into the query scale, v_scale into the output, so the inner loops are those of a
 * float32 or bf16 cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#include "decode_shape.h"

/* One sequence: scores for every key of its window (all query heads), softmax, then P.V, with
 * every element loaded through its kind (the portable path: no SIMD, or a head_dim it lacks).
 * scratch holds num_q_heads * window floats of scores and (num_q_heads + 1) * head_dim more. */
static void decode_one(const void *q, const void *k_cache, const void *v_cache, void *out,
                       const int32_t *table, int seq_len, const decode_shape *s, float *scratch) {
    const int H = s->num_q_heads, HK = s->num_kv_heads, D = s->head_dim, G = H / HK;
    const int start = (s->sliding_window > 0 && seq_len > s->sliding_window)
                          ? seq_len - s->sliding_window : 0;
    const int W = seq_len - start, ck = s->cache_kind;
    float *scores = scratch, *qf = scratch + (int64_t)H * W, *row = qf + (int64_t)H * D;
    for (int i = 0; i < H * D; i++) qf[i] = load_kind(q, i, s->q_kind) * (s->scale * s->k_scale);
    for (int t = start; t < seq_len; t++) {
        int64_t slot = (int64_t)table[t / s->block_size] * s->block_size + t % s->block_size;
        for (int kh = 0; kh < HK; kh++) {
            for (int d = 0; d < D; d++) row[d] = load_kind(k_cache, (slot * HK + kh) * D + d, ck);
            for (int g = 0; g < G; g++) {
                const float *qh = qf + (int64_t)(kh * G + g) * D;
                float acc = 0.0f;
                for (int d = 0; d < D; d++) acc += qh[d] * row[d];
                scores[(int64_t)(kh * G + g) * W + (t - start)] = acc;
            }
        }
    }
    for (int h = 0; h < H; h++) {
        float *sc = scores + (int64_t)h * W, m = -INFINITY, sum = 0.0f;
        if (s->softcap > 0.0f)
            for (int t = 0; t < W; t++) sc[t] = s->softcap * tanhf(sc[t] / s->softcap);
        for (int t = 0; t < W; t++) m = sc[t] > m ? sc[t] : m;
        for (int t = 0; t < W; t++) { sc[t] = expf(sc[t] - m); sum += sc[t]; }
        for (int t = 0; t < W; t++) sc[t] /= sum;
    }
    float *acc = qf; /* the scaled queries are no longer needed */
    memset(acc, 0, sizeof(float) * H * D);
    for (int t = start; t < seq_len; t++) {
        int64_t slot = (int64_t)table[t / s->block_size] * s->block_size + t % s->block_size;
        for (int kh = 0; kh < HK; kh++) {
            for (int d = 0; d < D; d++) row[d] = load_kind(v_cache, (slot * HK + kh) * D + d, ck);
            for (int g = 0; g < G; g++) {
                const int h = kh * G + g;
                const float p = scores[(int64_t)h * W + (t - start)];
                float *ah = acc + (int64_t)h * D;
                for (int d = 0; d < D; d++) ah[d] += p * row[d];
            }
        }
    }
    for (int i = 0; i < H * D; i++) store_kind(out, i, s->q_kind, acc[i] * s->v_scale);
}

#if defined(PAGEDSERVE_AVX512) || defined(PAGEDSERVE_AVX2)
/* Share `part` of `parts` of the next page's lines into L2 (rather than L1: measured faster, the
 * L1 miss buffers are few), spread over the work on the current page: prefetching a whole page at
 * once stalls the core once the miss buffers fill (measured 1.3-1.5x slower on a Zen 3; on a
 * Zen 5 with AVX-512, K/V streamed at 16 GB/s that way and at 22-25 GB/s spread per KV head). */
static inline void prefetch_share(const char *page, int64_t bytes, int part, int parts) {
    const int64_t lines = bytes / 64;
    for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; l++)
        _mm_prefetch(page + 64 * l, _MM_HINT_T1);
}

/* Each of gc rows of w scores becomes exp(score - the row's max), in place; the maxima go to
 * m[g] and the sums of the exponentials to l[g] (each SIMD path has its own). */
static void exp_rows(float *scores, int gc, int w, float softcap, float *m, float *l);

/* Each of gc rows of w scores becomes its softmax, in place (m and l: gc floats of scratch). */
static void softmax_rows(float *scores, int gc, int w, float softcap, float *m, float *l) {
    exp_rows(scores, gc, w, softcap, m, l);
    for (int g = 0; g < gc; g++) {
        float *sc = scores + (int64_t)g * w;
        const float inv = 1.0f / l[g];
        for (int t = 0; t < w; t++) sc[t] *= inv;
    }
}
#endif

#ifdef PAGEDSERVE_AVX512
/* The AVX-512 path, for head_dim a multiple of 16 up to 256. A few query heads of one KV head (a
 * head group) keep their queries and outputs in registers while that KV head's keys and values
 * stream past; head_dim / 16 (NV) and the group size (GC) are constants of each instance. */

/* sc[t] = cap * tanh(sc[t] / cap), 16 at a time: tanh(|y|) = (1 - e) / (1 + e), e = exp(-2|y|)
 * (never overflows), with y's sign put back. A scalar tanhf per score tripled decode attention. */
static void softcap_row(float *sc, int w, float softcap) {
    const __m512 cap = _mm512_set1_ps(softcap), one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    int t = 0;
    for (; t + 16 <= w; t += 16) {
        const __m512 y = _mm512_div_ps(_mm512_loadu_ps(sc + t), cap);
        const __m512 e = vexp_nonpositive(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f)));
        const __m512 th = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
        const __m512i signed_th = _mm512_or_si512(_mm512_castps_si512(th),
                                                  _mm512_and_si512(_mm512_castps_si512(y), sign));
        _mm512_storeu_ps(sc + t, _mm512_mul_ps(cap, _mm512_castsi512_ps(signed_th)));
    }
    for (; t < w; t++) sc[t] = softcap * tanhf(sc[t] / softcap);
}

/* exp_rows, 16 at a time. */
static void exp_rows(float *scores, int gc, int w, float softcap, float *m, float *l) {
    for (int g = 0; g < gc; g++) {
        float *sc = scores + (int64_t)g * w, mx = -INFINITY;
        if (softcap > 0.0f) softcap_row(sc, w, softcap);
        for (int t = 0; t < w; t++) mx = sc[t] > mx ? sc[t] : mx;
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        for (int t = 0; t < w; t += 16) {
            __mmask16 k = w - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (w - t)) - 1);
            __m512 e = vexp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + t), vm));
            e = _mm512_maskz_mov_ps(k, e);
            _mm512_mask_storeu_ps(sc + t, k, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        m[g] = mx;
        l[g] = _mm512_reduce_add_ps(vsum);
    }
}

/* Keys t0 .. t1-1, all in one page, in slots slot0 .. slot0 + t1-t0-1,
 * for query heads h0 .. h0+GC-1 of KV head kh, whose scaled float32 queries are rows of q
 * (T is the cache's element). The K instance writes their scores (row g of
 * `scores` has w entries, key t at t - start); the V instance adds p * v into `acc` ([H, D]). */
#define DEFINE_HEAD_GROUP(T, VLOAD, VSTORE, NV, GC)                                             \
static void hk_##T##_##NV##_##GC(const float *q, const T *k_cache, int64_t slot0, int t0,      \
                                 int t1,                                                       \
                                 int start, int w, int kh, int h0, const decode_shape *s,      \
                                 float *scores) {                                              \
    const int HK = s->num_kv_heads, D = NV * 16;                                                \
    __m512 qv[GC][NV], row[NV];                                                                 \
    for (int g = 0; g < GC; g++)                                                                \
        for (int j = 0; j < NV; j++)                                                            \
            qv[g][j] = _mm512_loadu_ps(q + (h0 + g) * D + j * 16);                              \
    for (int t = t0; t < t1; t++) {                                                             \
        const T *k = k_cache + ((slot0 + (t - t0)) * HK + kh) * D;                               \
        for (int j = 0; j < NV; j++) row[j] = VLOAD(k + j * 16);                               \
        for (int g = 0; g < GC; g++) {                                                          \
            __m512 a = _mm512_mul_ps(qv[g][0], row[0]);                                         \
            for (int j = 1; j < NV; j++) a = _mm512_fmadd_ps(qv[g][j], row[j], a);             \
            scores[(int64_t)(h0 + g) * w + (t - start)] = _mm512_reduce_add_ps(a);              \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
static void hv_##T##_##NV##_##GC(const T *v_cache, int64_t slot0, int t0, int t1, int start,   \
                                 int w, int kh, int h0, const decode_shape *s,                 \
                                 const float *scores, float *acc) {                            \
    const int HK = s->num_kv_heads, D = NV * 16;                                                \
    __m512 o[GC][NV], row[NV];                                                                  \
    for (int g = 0; g < GC; g++)                                                                \
        for (int j = 0; j < NV; j++) o[g][j] = _mm512_loadu_ps(acc + (h0 + g) * D + j * 16);   \
    for (int t = t0; t < t1; t++) {                                                             \
        const T *v = v_cache + ((slot0 + (t - t0)) * HK + kh) * D;                               \
        for (int j = 0; j < NV; j++) row[j] = VLOAD(v + j * 16);                               \
        for (int g = 0; g < GC; g++) {                                                          \
            const __m512 p = _mm512_set1_ps(scores[(int64_t)(h0 + g) * w + (t - start)]);      \
            for (int j = 0; j < NV; j++) o[g][j] = _mm512_fmadd_ps(p, row[j], o[g][j]);        \
        }                                                                                       \
    }                                                                                           \
    for (int g = 0; g < GC; g++)                                                                \
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(acc + (h0 + g) * D + j * 16, o[g][j]);   \
}

typedef float f32;
typedef uint16_t bf16;
typedef uint8_t fp8;
typedef void (*k_group_fn)(const void *, const void *, int64_t, int, int, int, int, int, int,
                           const decode_shape *, float *);
typedef void (*v_group_fn)(const void *, int64_t, int, int, int, int, int, int,
                           const decode_shape *, const float *, float *);

/* Instances: queries (or outputs) and one K/V row fit the 32 vector registers. Groups of up to 4
 * heads for head_dim <= 64, of up to 2 for head_dim <= 128, single heads for 256. */
#define DEFINE_NV_UP_TO_4(T, VL, VS, NV) DEFINE_HEAD_GROUP(T, VL, VS, NV, 1)                   \
    DEFINE_HEAD_GROUP(T, VL, VS, NV, 2) DEFINE_HEAD_GROUP(T, VL, VS, NV, 3)                     \
    DEFINE_HEAD_GROUP(T, VL, VS, NV, 4)
#define DEFINE_NV_UP_TO_8(T, VL, VS, NV) DEFINE_HEAD_GROUP(T, VL, VS, NV, 1)                   \
    DEFINE_HEAD_GROUP(T, VL, VS, NV, 2)
#define DEFINE_ALL(T, VL, VS)                                                                   \
    DEFINE_NV_UP_TO_4(T, VL, VS, 1) DEFINE_NV_UP_TO_4(T, VL, VS, 2)                             \
    DEFINE_NV_UP_TO_4(T, VL, VS, 3) DEFINE_NV_UP_TO_4(T, VL, VS, 4)                             \
    DEFINE_NV_UP_TO_8(T, VL, VS, 5) DEFINE_NV_UP_TO_8(T, VL, VS, 6)                             \
    DEFINE_NV_UP_TO_8(T, VL, VS, 7) DEFINE_NV_UP_TO_8(T, VL, VS, 8)                             \
    DEFINE_HEAD_GROUP(T, VL, VS, 16, 1)
DEFINE_ALL(f32, vload_f32, vstore_f32)
DEFINE_ALL(bf16, vload_bf16, vstore_bf16)
DEFINE_ALL(fp8, vload_fp8_div256, vstore_fp8)

#define ROW4(P, F, T, NV) {(F)P##_##T##_##NV##_1, (F)P##_##T##_##NV##_2,                        \
                           (F)P##_##T##_##NV##_3, (F)P##_##T##_##NV##_4}
#define ROW2(P, F, T, NV) {(F)P##_##T##_##NV##_1, (F)P##_##T##_##NV##_2, 0, 0}
#define NONE {0, 0, 0, 0}
#define TABLE(P, F, T) {NONE, ROW4(P, F, T, 1), ROW4(P, F, T, 2), ROW4(P, F, T, 3),             \
                        ROW4(P, F, T, 4), ROW2(P, F, T, 5), ROW2(P, F, T, 6), ROW2(P, F, T, 7),   \
                        ROW2(P, F, T, 8), NONE, NONE, NONE, NONE, NONE, NONE, NONE,               \
                        {(F)P##_##T##_16_1, 0, 0, 0}}
/* indexed by the cache's KIND_* */
static const k_group_fn K_GROUPS[3][17][4] = {TABLE(hk, k_group_fn, f32), TABLE(hk, k_group_fn, bf16),
                                              TABLE(hk, k_group_fn, fp8)};
static const v_group_fn V_GROUPS[3][17][4] = {TABLE(hv, v_group_fn, f32), TABLE(hv, v_group_fn, bf16),
                                              TABLE(hv, v_group_fn, fp8)};

/* Whether the AVX-512 path has an instance for this layer's head_dim and cache kind. */
static int simd_takes(const decode_shape *s) {
    const int D = s->head_dim, nv = D / 16;
    return D % 16 == 0 && nv <= 16 && K_GROUPS[s->cache_kind][nv][0] != 0;
}

/* Keys [t_lo, t_hi) of a context (pages t_lo / bs .. (t_hi - 1) / bs): page by page, every head
 * group's scores; softmax (m == NULL) or exp(score - max) with each head's max and sum in m and
 * l; page by page, P.V into acc ([H, D], float32). Each page ([block_size, kv_heads, head_dim])
 * is used whole while it is in L1, and the page used after it (after the last K page: the first
 * V page) is prefetched meanwhile, a share per KV head. */
static void attend_pages(const float *qf, const void *k_cache, const void *v_cache,
                         const int32_t *table, int t_lo, int t_hi, const decode_shape *s,
                         float *scores, float *acc, float *m, float *l, const char *then) {
    const int D = s->head_dim, nv = D / 16, H = s->num_q_heads, HK = s->num_kv_heads;
    const int G = H / HK, bs = s->block_size, ck = s->cache_kind, w = t_hi - t_lo;
    const int most = K_GROUPS[ck][nv][3] ? 4 : K_GROUPS[ck][nv][1] ? 2 : 1;
    const int64_t page_bytes = (int64_t)bs * HK * D * kind_size(ck);
    const int first = t_lo / bs, last = (t_hi - 1) / bs, pages = last - first + 1;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            if (m) exp_rows(scores, H, w, s->softcap, m, l);
            else softmax_rows(scores, H, w, s->softcap, acc, acc + H);
            memset(acc, 0, sizeof(float) * H * D);
        }
        for (int blk = first; blk <= last; blk++) {
            const int n = pass * pages + blk - first + 1; /* the page used next: K's, then V's */
            const char *next = n == 2 * pages ? then
                : (n < pages ? (const char *)k_cache : (const char *)v_cache) +
                  (int64_t)table[first + n % pages] * page_bytes;
            const int t0 = blk * bs > t_lo ? blk * bs : t_lo;
            const int64_t slot0 = (int64_t)table[blk] * bs + (t0 - (int64_t)blk * bs);
            const int t1 = (blk + 1) * bs < t_hi ? (blk + 1) * bs : t_hi;
            for (int kh = 0; kh < HK; kh++) {
                if (next) prefetch_share(next, page_bytes, kh, HK);
                for (int h0 = kh * G; h0 < (kh + 1) * G;) {
                    const int gc = (kh + 1) * G - h0 < most ? (kh + 1) * G - h0 : most;
                    if (pass == 0)
                        K_GROUPS[ck][nv][gc - 1](qf, k_cache, slot0, t0, t1, t_lo, w, kh, h0, s,
                                                 scores);
                    else
                        V_GROUPS[ck][nv][gc - 1](v_cache, slot0, t0, t1, t_lo, w, kh, h0, s,
                                                 scores, acc);
                    h0 += gc;
                }
            }
        }
    }
}

/* acc * scale into out (float32 or bf16, as q). */
static void store_out(const float *acc, float scale, const decode_shape *s, void *out) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int i = 0; i < s->num_q_heads * s->head_dim; i += 16) {
        const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + i), vs);
        if (s->q_kind == KIND_BF16) vstore_bf16((uint16_t *)out + i, o);
        else vstore_f32((float *)out + i, o);
    }
}

#define SIMD_PATH 1
#elif defined(PAGEDSERVE_AVX2)
/* The AVX2 path, for head_dim a multiple of 8. Sixteen vector registers cannot hold a head group's
 * queries as above; instead one query head's chunk of up to 64 elements (8 vectors) stays in
 * registers while the page's rows for its KV head pass (they are in L1 after the first head of the
 * group), and likewise one output chunk while P.V accumulates. No partial sums go through memory
 * inside the token loop (in cache, that store-to-load chain was the limit). */
#define ROW_VECTORS 8

/* Scores of head h, row chunk [c, c + 8n), for keys t0..t1-1 of one page (rows at `rows`, one
 * every `stride` elements): sc[t - t0] is set (c == 0) or added to. Four keys at a time: four
 * independent FMA chains, and their four vectors summed across lanes together by one hadd tree
 * (a horizontal sum per key had been the kernel's limit in cache: 1.3x there). */
#define DEFINE_AVX2_CHUNKS(T, VLOAD)                                                           \
static inline void k_chunk_##T(const float *qh, const T *rows, int64_t stride, int count,      \
                               int n, int first, float *sc) {                                 \
    __m256 qv[ROW_VECTORS];                                                                  \
    for (int j = 0; j < n; j++) qv[j] = _mm256_loadu_ps(qh + 8 * j);                          \
    int t = 0;                                                                               \
    for (; t + 4 <= count; t += 4) {                                                         \
        const T *x0 = rows + t * stride, *x1 = x0 + stride, *x2 = x1 + stride;                \
        const T *x3 = x2 + stride;                                                           \
        __m256 a0 = _mm256_mul_ps(qv[0], VLOAD(x0)), a1 = _mm256_mul_ps(qv[0], VLOAD(x1));     \
        __m256 a2 = _mm256_mul_ps(qv[0], VLOAD(x2)), a3 = _mm256_mul_ps(qv[0], VLOAD(x3));     \
        for (int j = 1; j < n; j++) {                                                        \
            a0 = _mm256_fmadd_ps(qv[j], VLOAD(x0 + 8 * j), a0);                              \
            a1 = _mm256_fmadd_ps(qv[j], VLOAD(x1 + 8 * j), a1);                              \
            a2 = _mm256_fmadd_ps(qv[j], VLOAD(x2 + 8 * j), a2);                              \
            a3 = _mm256_fmadd_ps(qv[j], VLOAD(x3 + 8 * j), a3);                              \
        }                                                                                    \
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));      \
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  \
        _mm_storeu_ps(sc + t, first ? s4 : _mm_add_ps(_mm_loadu_ps(sc + t), s4));             \
    }                                                                                        \
    for (; t < count; t++) {                                                                 \
        const T *x = rows + t * stride;                                                      \
        __m256 a = _mm256_mul_ps(qv[0], VLOAD(x));                                           \
        for (int j = 1; j < n; j++) a = _mm256_fmadd_ps(qv[j], VLOAD(x + 8 * j), a);           \
        sc[t] = first ? v8sum(a) : sc[t] + v8sum(a);                                         \
    }                                                                                        \
}                                                                                            \
static inline void v_chunk_##T(const float *p, const T *rows, int64_t stride, int count, int n, \
                               float *acc) {                                                 \
    __m256 o[ROW_VECTORS];                                                                   \
    for (int j = 0; j < n; j++) o[j] = _mm256_loadu_ps(acc + 8 * j);                          \
    for (int t = 0; t < count; t++) {                                                        \
        const __m256 vp = _mm256_set1_ps(p[t]);                                              \
        for (int j = 0; j < n; j++) o[j] = _mm256_fmadd_ps(vp, VLOAD(rows + t * stride + 8 * j), o[j]); \
    }                                                                                        \
    for (int j = 0; j < n; j++) _mm256_storeu_ps(acc + 8 * j, o[j]);                          \
}                                                                                            \
/* Keys (pass 0: scores, row h of w entries, key t at t - start) or values (pass 1: acc[h] +=  \
 * p * v) of slots slot0 .. slot0 + t1-t0-1 of one page, for every query head; meanwhile the   \
 * next page (NULL: none) is prefetched, a share per head. */                                 \
static void page_##T(int pass, const float *qf, const T *cache, int64_t slot0, int t0, int t1, \
                     int start, int w, const decode_shape *s, float *scores, float *acc,     \
                     const char *next, int64_t page_bytes) {                                 \
    const int HK = s->num_kv_heads, D = s->head_dim, H = s->num_q_heads, G = H / HK;         \
    const int count = t1 - t0;                                                               \
    for (int h = 0; h < H; h++) {                                                            \
        if (next) prefetch_share(next, page_bytes, h, H);                                    \
        const T *rows = cache + (slot0 * HK + h / G) * D;                                    \
        float *sc = scores + (int64_t)h * w + (t0 - start);                                  \
        for (int c = 0; c < D; c += 8 * ROW_VECTORS) {                                       \
            const int n = D - c >= 8 * ROW_VECTORS ? ROW_VECTORS : (D - c) / 8;               \
            if (pass == 0 && n == ROW_VECTORS)                                               \
                k_chunk_##T(qf + (int64_t)h * D + c, rows + c, (int64_t)HK * D, count,       \
                            ROW_VECTORS, c == 0, sc);                                        \
            else if (pass == 0)                                                              \
                k_chunk_##T(qf + (int64_t)h * D + c, rows + c, (int64_t)HK * D, count, n,    \
                            c == 0, sc);                                                     \
            else if (n == ROW_VECTORS)                                                       \
                v_chunk_##T(sc, rows + c, (int64_t)HK * D, count, ROW_VECTORS,               \
                            acc + (int64_t)h * D + c);                                       \
            else                                                                             \
                v_chunk_##T(sc, rows + c, (int64_t)HK * D, count, n, acc + (int64_t)h * D + c); \
        }                                                                                    \
    }                                                                                        \
}
typedef float f32;
typedef uint16_t bf16;
typedef uint8_t fp8;
DEFINE_AVX2_CHUNKS(f32, v8load_f32)
DEFINE_AVX2_CHUNKS(bf16, v8load_bf16)
DEFINE_AVX2_CHUNKS(fp8, v8load_fp8_div256)

/* sc[t] = cap * tanh(sc[t] / cap), 8 at a time (as the AVX-512 path's softcap_row). */
static void softcap_row(float *sc, int w, float softcap) {
    const __m256 cap = _mm256_set1_ps(softcap), one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int t = 0;
    for (; t + 8 <= w; t += 8) {
        const __m256 y = _mm256_div_ps(_mm256_loadu_ps(sc + t), cap);
        const __m256 e = v8exp_nonpositive(_mm256_mul_ps(_mm256_andnot_ps(sign, y),
                                                         _mm256_set1_ps(-2.0f)));
        const __m256 th = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        _mm256_storeu_ps(sc + t, _mm256_mul_ps(cap, _mm256_or_ps(th, _mm256_and_ps(y, sign))));
    }
    for (; t < w; t++) sc[t] = softcap * tanhf(sc[t] / softcap);
}

/* exp_rows, 8 at a time. */
static void exp_rows(float *scores, int rows, int w, float softcap, float *m, float *l) {
    for (int g = 0; g < rows; g++) {
        float *sc = scores + (int64_t)g * w, mx = -INFINITY, sum = 0.0f;
        if (softcap > 0.0f) softcap_row(sc, w, softcap);
        for (int t = 0; t < w; t++) mx = sc[t] > mx ? sc[t] : mx;
        const __m256 vm = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        int t = 0;
        for (; t + 8 <= w; t += 8) {
            const __m256 e = v8exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc + t), vm));
            _mm256_storeu_ps(sc + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        for (; t < w; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
        m[g] = mx;
        l[g] = sum + v8sum(vsum);
    }
}

static int simd_takes(const decode_shape *s) {
    return s->head_dim % 8 == 0;
}

/* Keys [t_lo, t_hi) of a context: page by page every head's scores; softmax (m == NULL) or
 * exp(score - max) with each head's max and sum in m and l; page by page P.V into acc ([H, D],
 * float32). The next page of the same pass is prefetched a share per query head. */
static void attend_pages(const float *qf, const void *k_cache, const void *v_cache,
                         const int32_t *table, int t_lo, int t_hi, const decode_shape *s,
                         float *scores, float *acc, float *m, float *l, const char *then) {
    const int D = s->head_dim, H = s->num_q_heads, HK = s->num_kv_heads, bs = s->block_size;
    const int ck = s->cache_kind, w = t_hi - t_lo, last = (t_hi - 1) / bs;
    const int64_t page_bytes = (int64_t)bs * HK * D * kind_size(ck);
    for (int pass = 0; pass < 2; pass++) {
        const char *cache = pass == 0 ? k_cache : v_cache;
        if (pass == 1) {
            if (m) exp_rows(scores, H, w, s->softcap, m, l);
            else softmax_rows(scores, H, w, s->softcap, acc, acc + H); /* acc: unused until P.V */
            memset(acc, 0, sizeof(float) * H * D);
        }
        for (int blk = t_lo / bs; blk <= last; blk++) {
            const char *next = blk < last ? cache + (int64_t)table[blk + 1] * page_bytes
                             : pass == 1 ? then : NULL;
            const int t0 = blk * bs > t_lo ? blk * bs : t_lo;
            const int64_t slot0 = (int64_t)table[blk] * bs + (t0 - (int64_t)blk * bs);
            const int t1 = (blk + 1) * bs < t_hi ? (blk + 1) * bs : t_hi;
            if (ck == KIND_BF16) page_bf16(pass, qf, (const uint16_t *)cache, slot0, t0, t1, t_lo,
                                           w, s, scores, acc, next, page_bytes);
            else if (ck == KIND_FP8) page_fp8(pass, qf, (const uint8_t *)cache, slot0, t0, t1,
                                              t_lo, w, s, scores, acc, next, page_bytes);
            else page_f32(pass, qf, (const float *)cache, slot0, t0, t1, t_lo, w, s, scores, acc,
                          next, page_bytes);
        }
    }
}

/* acc * scale into out (float32 or bf16, as q). */
static void store_out(const float *acc, float scale, const decode_shape *s, void *out) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int i = 0; i < s->num_q_heads * s->head_dim; i += 8) {
        const __m256 o = _mm256_mul_ps(_mm256_loadu_ps(acc + i), vs);
        if (s->q_kind == KIND_BF16) v8store_bf16((uint16_t *)out + i, o);
        else v8store_f32((float *)out + i, o);
    }
}
#define SIMD_PATH 1
#endif

/* The first key of a row's window (sliding windows). */
static int window_start(int seq_len, const decode_shape *s) {
    return s->sliding_window > 0 && seq_len > s->sliding_window ? seq_len - s->sliding_window : 0;
}

#ifdef SIMD_PATH
/* The float32 queries, scaled (k_scale and vload_fp8_div256's 2^-8 folded in). */
static void scaled_query(const void *q, const decode_shape *s, float *qf) {
    const float unit = s->cache_kind == KIND_FP8 ? 256.0f : 1.0f;
    for (int i = 0; i < s->num_q_heads * s->head_dim; i++)
        qf[i] = load_kind(q, i, s->q_kind) * (s->scale * s->k_scale * unit);
}

static inline float v_unit(const decode_shape *s) {
    return s->v_scale * (s->cache_kind == KIND_FP8 ? 256.0f : 1.0f);
}

/* One sequence's whole window, into out. 0 when head_dim has no instance (the caller falls
 * back to the portable loop). */
static int decode_one_simd(const void *q, const void *k_cache, const void *v_cache, void *out,
                             const int32_t *table, int seq_len, const decode_shape *s,
                             float *scratch, const char *then) {
    if (!simd_takes(s)) return 0;
    const int H = s->num_q_heads, D = s->head_dim, start = window_start(seq_len, s);
    float *scores = scratch, *acc = scratch + (int64_t)H * (seq_len - start);
    float *qf = acc + (int64_t)H * D;
    scaled_query(q, s, qf);
    attend_pages(qf, k_cache, v_cache, table, start, seq_len, s, scores, acc, NULL, NULL, then);
    store_out(acc, v_unit(s), s, out);
    return 1;
}

/* Keys [t_lo, t_hi) of one sequence: unnormalized P.V into acc, each head's max and sum of
 * exponentials into m and l (merge_parts combines the parts). */
static void decode_part_simd(const void *q, const void *k_cache, const void *v_cache,
                             const int32_t *table, int t_lo, int t_hi, const decode_shape *s,
                             float *scratch, float *acc, float *m, float *l, const char *then) {
    float *qf = scratch, *scores = qf + (int64_t)s->num_q_heads * s->head_dim;
    scaled_query(q, s, qf);
    attend_pages(qf, k_cache, v_cache, table, t_lo, t_hi, s, scores, acc, m, l, then);
}

/* A window of more pages than this is attended in parts of this many pages, spread over the
 * threads with the other rows' work and merged after: a lone long row no longer leaves all but
 * one thread idle. The parts depend on the row's window alone, so its result does not depend on
 * its batch (--batch-invariant). Each part starts on a cold page, so shorter parts cost rows that
 * already fill the threads (16 pages: 10% on 8 rows of 1,024 tokens). */
#define PART_PAGES 32

static int parts_of(int seq_len, int start, const decode_shape *s) {
    if (!simd_takes(s)) return 1;
    const int pages = (seq_len - 1) / s->block_size - start / s->block_size + 1;
    return (pages + PART_PAGES - 1) / PART_PAGES;
}

/* The parts' [acc (H * D) | m (H) | l (H)] blocks, `stride` floats apart, merged into out: each
 * head's exponentials rescaled to the largest max, summed, normalized (into part 0's acc). */
static void merge_parts(float *part, int parts, int64_t stride, const decode_shape *s,
                        void *out) {
    const int H = s->num_q_heads, D = s->head_dim;
    for (int h = 0; h < H; h++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int p = 0; p < parts; p++) {
            const float m = part[p * stride + (int64_t)H * D + h];
            mx = m > mx ? m : mx;
        }
        float *acc = part + (int64_t)h * D;
        for (int p = 0; p < parts; p++) {
            const float *blk = part + p * stride;
            const float c = expf(blk[(int64_t)H * D + h] - mx);
            sum += blk[(int64_t)H * D + H + h] * c;
            for (int d = 0; d < D; d++)
                acc[d] = p == 0 ? acc[d] * c : acc[d] + blk[(int64_t)h * D + d] * c;
        }
        for (int d = 0; d < D; d++) acc[d] /= sum;
    }
    store_out(part, v_unit(s), s, out);
}
#else /* the portable loop only: every row whole */
#define PART_PAGES 1
static int decode_one_simd(const void *q, const void *k_cache, const void *v_cache, void *out,
                             const int32_t *table, int seq_len, const decode_shape *s,
                             float *scratch, const char *then) {
    (void)q, (void)k_cache, (void)v_cache, (void)out, (void)table, (void)seq_len, (void)s;
    (void)scratch, (void)then;
    return 0;
}
static int parts_of(int seq_len, int start, const decode_shape *s) {
    (void)seq_len, (void)start, (void)s;
    return 1;
}
static void decode_part_simd(const void *q, const void *k_cache, const void *v_cache,
                             const int32_t *table, int t_lo, int t_hi, const decode_shape *s,
                             float *scratch, float *acc, float *m, float *l, const char *then) {
    (void)q, (void)k_cache, (void)v_cache, (void)table, (void)t_lo, (void)t_hi, (void)s;
    (void)scratch, (void)acc, (void)m, (void)l, (void)then;
}
static void merge_parts(float *part, int parts, int64_t stride, const decode_shape *s,
                        void *out) {
    (void)part, (void)parts, (void)stride, (void)s, (void)out;
}
#endif

/* One call's work: the rows and caches, each work item's row and part, the split rows' partial
 * blocks (`stride` floats each: acc, m, l). */
typedef struct {
    const char *q;
    const void *k_cache, *v_cache;
    char *out;
    const int32_t *seqs, *q_rows, *seq_lens, *block_tables;
    const decode_shape *s;
    int items, *item_row, *item_part;
    float *partial;
    int64_t stride;
} decode_work;

/* Which row and part each work item is, rows in order, a row's parts together; -1 when out of
 * memory. */
static int work_items(decode_work *w, int count) {
    int items = 0;
    for (int i = 0; i < count; i++) {
        const int len = w->seq_lens[w->seqs[i]];
        items += parts_of(len, window_start(len, w->s), w->s);
    }
    w->item_row = malloc(sizeof(int) * (items > 0 ? items : 1));
    w->item_part = malloc(sizeof(int) * (items > 0 ? items : 1));
    if (!w->item_row || !w->item_part) return -1;
    for (int i = 0, it = 0; i < count; i++) {
        const int len = w->seq_lens[w->seqs[i]];
        const int parts = parts_of(len, window_start(len, w->s), w->s);
        for (int p = 0; p < parts; p++, it++) w->item_row[it] = i, w->item_part[it] = p;
    }
    w->items = items;
    return 0;
}

/* Item it's keys [*t_lo, *t_hi) (a part of its row's window, or all of it); its sequence. */
static int item_keys(const decode_work *w, int it, int *t_lo, int *t_hi) {
    const int seq = w->seqs[w->item_row[it]], len = w->seq_lens[seq];
    const int start = window_start(len, w->s), bs = w->s->block_size;
    const int page = start / bs + w->item_part[it] * PART_PAGES;
    *t_lo = page * bs > start ? page * bs : start;
    *t_hi = (page + PART_PAGES) * bs < len ? (page + PART_PAGES) * bs : len;
    return seq;
}

/* The first K page item it reads: prefetched while the item before it on the thread ends. */
static const char *item_first_page(const decode_work *w, int it) {
    int t_lo, t_hi;
    const int seq = item_keys(w, it, &t_lo, &t_hi);
    const decode_shape *s = w->s;
    const int64_t page_bytes = (int64_t)s->block_size * s->num_kv_heads * s->head_dim *
                               kind_size(s->cache_kind);
    const int32_t page = w->block_tables[seq * s->block_table_stride + t_lo / s->block_size];
    return (const char *)w->k_cache + page * page_bytes;
}

/* Item it: a whole row into out, or one part of a long row into its partial block; `then`: the
 * page the thread reads next (prefetched during this item's last one). */
static void run_item(const decode_work *w, int it, float *scratch, const char *then) {
    int t_lo, t_hi;
    const int seq = item_keys(w, it, &t_lo, &t_hi), len = w->seq_lens[seq];
    const decode_shape *s = w->s;
    const int64_t qsize = kind_size(s->q_kind);
    const char *qs = w->q + w->q_rows[seq] * s->q_row_stride * qsize;
    const int32_t *table = w->block_tables + seq * s->block_table_stride;
    if (parts_of(len, window_start(len, s), s) == 1) {
        char *os = w->out + w->q_rows[seq] * s->out_row_stride * qsize;
        if (!decode_one_simd(qs, w->k_cache, w->v_cache, os, table, len, s, scratch, then))
            decode_one(qs, w->k_cache, w->v_cache, os, table, len, s, scratch);
        return;
    }
    float *blk = w->partial + it * w->stride, *m = blk + (int64_t)s->num_q_heads * s->head_dim;
    decode_part_simd(qs, w->k_cache, w->v_cache, table, t_lo, t_hi, s, scratch, blk, m,
                     m + s->num_q_heads, then);
}

/* Each split row's parts, merged into its output row (after every item ran). */
static void merge_split_rows(const decode_work *w) {
    #pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < w->items; it++) {
        const int seq = w->seqs[w->item_row[it]], len = w->seq_lens[seq];
        const int parts = parts_of(len, window_start(len, w->s), w->s);
        if (w->item_part[it] == 0 && parts > 1)
            merge_parts(w->partial + it * w->stride, parts, w->stride, w->s,
                        w->out + w->q_rows[seq] * w->s->out_row_stride * kind_size(w->s->q_kind));
    }
}

/* The decode rows seqs[0:count) of the batch, longest context first: sequence i's query is row
 * q_rows[i] of q and out, its context seq_lens[i] tokens long, its pages row i of block_tables.
 * q and out hold s->q_kind elements (float32 or bf16), the caches s->cache_kind ones.
 * The work (whole rows, and the parts of long ones: PART_PAGES) is claimed by up to num_threads
 * threads one item at a time, longest rows first, so the threads finish together; each thread
 * claims its next item before running the current one, so that item's first page is prefetched
 * meanwhile. Then each split row's parts are merged. Returns 0, or -1 when memory could not be
 * allocated (rows are not all written then). */
int paged_decode(const char *q, const void *k_cache, const void *v_cache, char *out,
                 const int32_t *seqs, const int32_t *q_rows, const int32_t *seq_lens,
                 const int32_t *block_tables, int count, int num_threads, const decode_shape *s) {
    int longest = 1, failed = 0, claimed = 0;
    for (int i = 0; i < count; i++)
        longest = seq_lens[seqs[i]] > longest ? seq_lens[seqs[i]] : longest;
    const int64_t H = s->num_q_heads, D = s->head_dim;
    decode_work w = {q, k_cache, v_cache, out, seqs, q_rows, seq_lens, block_tables, s,
                     0, NULL, NULL, NULL, H * D + 2 * H};
    failed = work_items(&w, count);
    /* a partial block per item (only split rows' are used) */
    if (!failed && w.items > count && !(w.partial = malloc(sizeof(float) * w.stride * w.items)))
        failed = -1;
    const int threads = num_threads < w.items ? num_threads : w.items;
    if (!failed) {
        #pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(|: failed)
        {
            float *scratch = malloc(sizeof(float) * (H * longest + (2 * H + 1) * D));
            failed = scratch == NULL;
            int it = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            while (it < w.items) {
                const int after = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
                if (scratch)
                    run_item(&w, it, scratch, after < w.items ? item_first_page(&w, after) : NULL);
                it = after;
            }
            free(scratch);
            #pragma omp barrier
            if (w.partial) merge_split_rows(&w);
        }
    }
    free(w.item_row), free(w.item_part), free(w.partial);
    return failed ? -1 : 0;
}
