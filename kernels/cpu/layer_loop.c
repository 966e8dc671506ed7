/* A Llama-family decoder's layers as one C loop over the engine's own kernels.
 *
 * At decode sizes a layer is some ten kernel calls of a few microseconds each, and calling them
 * one by one from Python (module dispatch, argument checks, ctypes marshalling, a new tensor per
 * result) costs about as much again: on SmolLM2 at batch 1, 1.5-2 ms of a 7-8 ms step. Here one
 * call runs every layer, through the very functions the Python path calls (their addresses come
 * from the libraries already loaded: kernels/cpu/layer_loop.py), in the same order on the same
 * inputs, so its results are the Python path's bit for bit; only the glue is gone.
 *
 * Per layer, with the residual stream carried beside the hidden state as models/llama.py does:
 *   normed = rms_norm(residual) (layer 0) or add_rms_norm(proj, residual)  -> qkv GEMM
 *   -> (Qwen3: q and k heads normed) -> rotary on q and k in place -> K/V written to the pages -> paged attention -> o GEMM
 *   -> add_rms_norm(proj, residual) -> gate-up GEMM -> SiLU-and-mul -> down GEMM (into proj)
 * and after the last: out = add_rms_norm(proj, residual) with the final norm's weight.
 */
#include <stdint.h>

#include "decode_shape.h"

typedef int (*quant_gemm_fn)(const void *x, int64_t x_stride, int x_bf16, const uint8_t *codes,
                             const void *scales, const void *offsets, int half_scales,
                             const float *bias, void *out, int out_bf16, int64_t m, int64_t n,
                             int64_t k, int64_t group, int bits, int num_threads);
typedef void (*rms_norm_fn)(const void *x, int64_t x_stride, const void *w, void *out,
                            int64_t rows, int hidden, float eps);
typedef void (*rms_norm_heads_fn)(const void *x, int64_t x_stride, const void *w, void *out,
                                  int64_t out_stride, int64_t tokens, int heads, int head_dim,
                                  float eps);
typedef void (*add_rms_norm_fn)(const void *x, void *residual, const void *w, void *out,
                                int64_t rows, int hidden, float eps);
typedef void (*rotary_fn)(void *x, int64_t x_stride, int64_t rows, int heads, int head_dim,
                          const float *cos_sin, int rot, const int64_t *positions);
typedef int (*write_kv_fn)(const char *key, int64_t key_stride, const char *value,
                           int64_t value_stride, char *k_cache, char *v_cache,
                           const int64_t *slots, int64_t tokens, int64_t row, int64_t elem,
                           int64_t num_slots);
typedef int (*paged_decode_fn)(const char *q, const void *k_cache, const void *v_cache, char *out,
                               const int32_t *seqs, const int32_t *q_rows,
                               const int32_t *seq_lens, const int32_t *block_tables, int count,
                               int num_threads, const decode_shape *s);
typedef void (*act_and_mul_fn)(const void *x, int64_t x_stride, void *out, int64_t rows, int d);
typedef void (*panel_gemm_fn)(const float *x, int64_t x_stride, const void *packed,
                              const float *bias, float *out, int64_t m, int64_t n, int64_t k,
                              int num_threads);

typedef int (*pairs_gemm_fn)(const void *x, int64_t x_stride, const void *packed,
                             const float *bias, void *out, int64_t m, int64_t n, int64_t k,
                             int num_threads);

/* gemm_weight.kind: quantized, panel_gemm's panels (float32 x), panel_gemm512's pairs (bf16 x) */
enum { GEMM_QUANT, GEMM_PANELS_F32, GEMM_PANELS_BF16, GEMM_PAIRS };

typedef struct { /* a packed quantized weight (kernels/cpu/quant_linear.py's PackedQuantWeight),
                  * or a float32 model's dense weight in panel_gemm's panels (codes: the panels) */
    const uint8_t *codes;
    const void *scales, *offsets; /* offsets NULL: symmetric */
    const float *bias;            /* NULL: none */
    int64_t n, k, group;
    int bits, half_scales, kind;
} gemm_weight;

typedef struct {
    gemm_weight qkv, o, gate_up, down;
    const void *input_norm, *post_norm;
    const void *q_norm, *k_norm; /* per-head norms before rotary (Qwen3), or NULL */
    char *k_cache, *v_cache;
    float scale, softcap, k_scale, v_scale;
    int sliding_window;
} layer_weights;

typedef struct {
    quant_gemm_fn gemm;
    rms_norm_fn rms_norm;
    rms_norm_heads_fn rms_norm_heads;
    add_rms_norm_fn add_rms_norm;
    rotary_fn rotary;
    write_kv_fn write_kv;
    paged_decode_fn paged_decode;
    act_and_mul_fn silu_and_mul;
    panel_gemm_fn panels_f32, panels_bf16; /* NULL where panel_gemm has no path */
    pairs_gemm_fn pairs;                   /* NULL where panel_gemm512 has no path */
    const layer_weights *layers;
    const void *final_norm;
    const float *cos_sin;
    int num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, rot;
    int bf16;          /* activations and KV cache bf16, else float32 */
    int x_bf16;        /* the GEMM takes bf16 x as it is (quant_gemm_features) */
    int block_size, kind;
    int64_t num_slots; /* pages x block size */
    float eps;
} decoder;

typedef struct { /* one step: T rows; buffers [T, width] contiguous, in the activation dtype */
    int64_t rows;
    void *residual; /* the embeddings in, the residual stream after */
    void *normed, *qkv, *attn, *proj, *gate_up, *act, *out;
    const int64_t *positions, *slots;
    const int32_t *seqs, *q_rows, *seq_lens, *block_tables; /* paged_decode's decode rows */
    int64_t block_table_stride;
    int count, threads;
} decode_step;

static int product(const decoder *m, const gemm_weight *w, const void *x, void *out,
                   const decode_step *s) {
    if (w->kind == GEMM_PAIRS) /* bf16 activations */
        return m->pairs(x, w->k, w->codes, w->bias, out, s->rows, w->n, w->k, s->threads);
    if (w->kind != GEMM_QUANT) { /* float32 activations only */
        (w->kind == GEMM_PANELS_BF16 ? m->panels_bf16 : m->panels_f32)(
            x, w->k, w->codes, w->bias, out, s->rows, w->n, w->k, s->threads);
        return 0;
    }
    return m->gemm(x, w->k, m->x_bf16, w->codes, w->scales, w->offsets, w->half_scales, w->bias,
                   out, m->bf16, s->rows, w->n, w->k, w->group, w->bits, s->threads);
}

static char *row_at(void *base, int64_t elements, int bf16) {
    return (char *)base + elements * (bf16 ? 2 : 4);
}

/* rotary, K/V into the pages, attention, o projection into s->proj; 0, -1 (out of memory) or
 * 1 + the first token whose slot lies outside the cache */
static int attention(const decoder *m, const layer_weights *l, const decode_step *s) {
    const int H = m->num_heads, KV = m->num_kv_heads, D = m->head_dim;
    const int64_t width = (int64_t)(H + 2 * KV) * D;
    char *k = row_at(s->qkv, (int64_t)H * D, m->bf16), *v = row_at(s->qkv, (int64_t)(H + KV) * D, m->bf16);
    if (l->q_norm) { /* in place in the qkv rows, as the module path's new q and k hold them */
        m->rms_norm_heads(s->qkv, width, l->q_norm, s->qkv, width, s->rows, H, D, m->eps);
        m->rms_norm_heads(k, width, l->k_norm, k, width, s->rows, KV, D, m->eps);
    }
    m->rotary(s->qkv, width, s->rows, H, D, m->cos_sin, m->rot, s->positions);
    m->rotary(k, width, s->rows, KV, D, m->cos_sin, m->rot, s->positions);
    const int bad = m->write_kv(k, width, v, width, l->k_cache, l->v_cache, s->slots, s->rows,
                                (int64_t)KV * D, m->bf16 ? 2 : 4, m->num_slots);
    if (bad >= 0) return 1 + bad;
    const decode_shape shape = {H, KV, D, m->block_size, width, (int64_t)H * D,
                                s->block_table_stride, l->scale, l->softcap, l->sliding_window,
                                m->kind, m->kind, l->k_scale, l->v_scale};
    /* all threads: paged_decode spreads a long row's parts over them too */
    if (s->count && m->paged_decode(s->qkv, l->k_cache, l->v_cache, s->attn, s->seqs, s->q_rows,
                                    s->seq_lens, s->block_tables, s->count, s->threads, &shape))
        return -1;
    return product(m, &l->o, s->attn, s->proj, s);
}

static int one_layer(const decoder *m, int i, const decode_step *s) {
    const layer_weights *l = &m->layers[i];
    if (i == 0)
        m->rms_norm(s->residual, m->hidden, l->input_norm, s->normed, s->rows, m->hidden, m->eps);
    else
        m->add_rms_norm(s->proj, s->residual, l->input_norm, s->normed, s->rows, m->hidden, m->eps);
    if (product(m, &l->qkv, s->normed, s->qkv, s)) return -1;
    const int failed = attention(m, l, s);
    if (failed) return failed;
    m->add_rms_norm(s->proj, s->residual, l->post_norm, s->normed, s->rows, m->hidden, m->eps);
    if (product(m, &l->gate_up, s->normed, s->gate_up, s)) return -1;
    m->silu_and_mul(s->gate_up, 2 * (int64_t)m->intermediate, s->act, s->rows, m->intermediate);
    return product(m, &l->down, s->act, s->proj, s);
}

/* Every layer, then the final norm into s->out. Returns 0; -1 when a kernel could not allocate
 * its scratch memory; or 1 + the first token whose slot is outside the cache (nothing of that
 * layer's K/V is written then). */
int layer_loop(const decoder *m, const decode_step *s) {
    for (int i = 0; i < m->num_layers; i++) {
        const int failed = one_layer(m, i, s);
        if (failed) return failed;
    }
    m->add_rms_norm(s->proj, s->residual, m->final_norm, s->out, s->rows, m->hidden, m->eps);
    return 0;
}
