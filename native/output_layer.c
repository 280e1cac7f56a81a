/* output_layer.c - the q8_0 output layer of output_layer.h: packing, capture and the kernel. */
#define _POSIX_C_SOURCE 200809L
#include "output_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ngram.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define RL_HEAD_X86 1
#include <immintrin.h>
#include <pthread.h>
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")))
#endif

/* One packed group: 16 vocabulary rows x one 32-value block. Quants first, lane i holding row i's
 * four values 4c..4c+3 in chunk c; then the u8-offset correction -128 * sum(q) and the scales. */
#define GROUP 16
#define QUANT_BYTES 512
#define CELL_BYTES (QUANT_BYTES + GROUP * 4 + GROUP * 4)
#define TILE 8 /* batch rows per pass over a group: each weight load serves this many */
#define NAME "result_norm"

typedef struct {
    uint16_t d;
    int8_t qs[32];
} block_q8_0; /* llama.cpp's layout: an fp16 scale, then 32 signed values */

struct rl_head {
    int64_t n_vocab, n_embd, n_blocks, n_groups;
    int max_rows, captured;
    bool armed;
    uint8_t *packed;      /* n_groups x n_blocks cells */
    float *hidden;        /* max_rows x n_embd: the captured rows */
    uint8_t *xq;          /* max_rows x n_embd: their quants + 128 */
    float *xd;            /* max_rows x n_blocks: their scales */
    rl_tensor_name_fn name;
    rl_tensor_data_fn data;
    rl_tensor_size_fn size;
};

int rl_head_supported(void) {
#ifdef RL_HEAD_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

#ifdef RL_HEAD_X86
static void *alloc64(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n) == 0 ? p : NULL;
}

__attribute__((target("f16c"))) static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("f16c"))) static float round_to_half(float f) { return _cvtsh_ss(_cvtss_sh(f, 0)); }
#endif

int rl_head_new(const void *weights, int64_t n_vocab, int64_t n_embd, int max_rows,
                rl_tensor_name_fn name, rl_tensor_data_fn data, rl_tensor_size_fn size, rl_head **out) {
    *out = NULL;
#ifndef RL_HEAD_X86
    (void)weights, (void)n_vocab, (void)n_embd, (void)max_rows, (void)name, (void)data, (void)size;
    return RL_EINVAL;
#else
    if (!rl_head_supported() || n_vocab < 1 || n_embd < 32 || n_embd % 32 || max_rows < 1 || !name || !data ||
        !size)
        return RL_EINVAL;
    rl_head *h = calloc(1, sizeof *h);
    if (!h) return RL_ENOMEM;
    h->n_vocab = n_vocab, h->n_embd = n_embd, h->n_blocks = n_embd / 32, h->n_groups = (n_vocab + GROUP - 1) / GROUP;
    h->max_rows = max_rows, h->name = name, h->data = data, h->size = size;
    size_t packed = (size_t)h->n_groups * h->n_blocks * CELL_BYTES;
    size_t xq = ((size_t)max_rows * n_embd + 63) / 64 * 64;
    h->packed = alloc64(packed);
    h->hidden = malloc((size_t)max_rows * n_embd * sizeof(float));
    h->xq = alloc64(xq);
    h->xd = malloc((size_t)max_rows * h->n_blocks * sizeof(float));
    if (!h->packed || !h->hidden || !h->xq || !h->xd) {
        rl_head_free(h);
        return RL_ENOMEM;
    }
    memset(h->packed, 0, packed); /* the rows past n_vocab in the last group stay zero */
    const block_q8_0 *w = weights;
    for (int64_t g = 0; g < h->n_groups; g++) {
        for (int64_t b = 0; b < h->n_blocks; b++) {
            uint8_t *cell = h->packed + ((size_t)g * h->n_blocks + b) * CELL_BYTES;
            int32_t *corr = (int32_t *)(cell + QUANT_BYTES);
            float *scale = (float *)(cell + QUANT_BYTES + GROUP * 4);
            for (int i = 0; i < GROUP && g * GROUP + i < n_vocab; i++) {
                const block_q8_0 *blk = w + (size_t)(g * GROUP + i) * h->n_blocks + b;
                int32_t sum = 0;
                for (int c = 0; c < 8; c++) memcpy(cell + c * 64 + i * 4, blk->qs + c * 4, 4);
                for (int j = 0; j < 32; j++) sum += blk->qs[j];
                corr[i] = -128 * sum;
                scale[i] = half_to_float(blk->d);
            }
        }
    }
    *out = h;
    return RL_OK;
#endif
}

void rl_head_free(rl_head *h) {
    if (!h) return;
    free(h->packed);
    free(h->hidden);
    free(h->xq);
    free(h->xd);
    free(h);
}

void rl_head_arm(rl_head *h, bool armed) {
    h->armed = armed;
    if (armed) h->captured = 0;
}

int rl_head_captured(const rl_head *h) { return h->captured; }

bool rl_head_eval_callback(void *tensor, bool ask, void *user_data) {
    rl_head *h = user_data;
    if (!h->armed || strcmp(h->name(tensor), NAME) != 0) return !ask; /* ask for nothing, stop nothing */
    if (ask) return true;
    int64_t n = h->size(tensor);
    if (n % h->n_embd || n / h->n_embd > h->max_rows) {
        h->captured = -1;
    } else {
        memcpy(h->hidden, h->data(tensor), (size_t)n * sizeof(float));
        h->captured = (int)(n / h->n_embd);
    }
    return false; /* the output layer is ours: stop the graph before llama.cpp's */
}

#ifdef RL_HEAD_X86
/* ggml's x86 quantize_row_q8_0, plus 128 so the quants are unsigned for vpdpbusd. */
static void quantize_rows(rl_head *h, const float *x, int n_rows) {
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t b = 0; b < h->n_blocks; b++) {
            const float *v = x + r * h->n_embd + b * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            uint8_t *q = h->xq + r * h->n_embd + b * 32;
            for (int j = 0; j < 32; j++) q[j] = (uint8_t)((int)nearbyintf(v[j] * id) + 128);
            h->xd[r * h->n_blocks + b] = round_to_half(amax / 127.0f);
        }
    }
}

/* Each row's best k so far (best first, ties to the smaller id: ids arrive in increasing order
 * within a job); the caller has checked that (v, id) beats the last. */
static void keep_best(float *vals, int32_t *ids, int k, float v, int32_t id) {
    int p = k - 1;
    for (; p > 0 && (vals[p - 1] < v || (vals[p - 1] == v && ids[p - 1] > id)); p--) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
    }
    vals[p] = v;
    ids[p] = id;
}

/* Best k of the rows of one job, or where the rows go: one of out (logits) or vals/ids is set. */
typedef struct {
    float *out;    /* n_rows x n_vocab logits */
    float *vals;   /* n_rows x k: each row's best k so far */
    int32_t *ids;
    int k;
} sink;

/* Logits of rows r0..r0+R-1 for the 16 vocabulary rows of group g, stored or kept if among
 * their row's best k. */
KERNEL static inline __attribute__((always_inline)) void tile(const rl_head *h, int64_t g, int r0, const int R,
                                                               const sink *to) {
    const uint8_t *cells = h->packed + (size_t)g * h->n_blocks * CELL_BYTES;
    __m512 acc[TILE];
    __m512i dot[TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < h->n_blocks; b++) {
        const uint8_t *cell = cells + (size_t)b * CELL_BYTES;
        const __m512i corr = _mm512_load_si512(cell + QUANT_BYTES);
        for (int r = 0; r < R; r++) dot[r] = corr;
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_load_si512(cell + c * 64);
            for (int r = 0; r < R; r++) {
                int32_t x4;
                memcpy(&x4, h->xq + (size_t)(r0 + r) * h->n_embd + b * 32 + c * 4, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], _mm512_set1_epi32(x4), w);
            }
        }
        const __m512 scale = _mm512_load_ps((const float *)(cell + QUANT_BYTES + GROUP * 4));
        for (int r = 0; r < R; r++) {
            const __m512 d = _mm512_mul_ps(scale, _mm512_set1_ps(h->xd[(size_t)(r0 + r) * h->n_blocks + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), d, acc[r]);
        }
    }
    int64_t left = h->n_vocab - g * GROUP;
    __mmask16 keep = left >= GROUP ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    if (to->out) {
        for (int r = 0; r < R; r++)
            _mm512_mask_storeu_ps(to->out + (size_t)(r0 + r) * h->n_vocab + g * GROUP, keep, acc[r]);
        return;
    }
    const int k = to->k;
    for (int r = 0; r < R; r++) { /* once a row's list fills, few groups hold a value above its last */
        float *vals = to->vals + (size_t)(r0 + r) * k;
        int32_t *ids = to->ids + (size_t)(r0 + r) * k;
        __mmask16 m = _mm512_mask_cmp_ps_mask(keep, acc[r], _mm512_set1_ps(vals[k - 1]), _CMP_GT_OQ);
        if (!m) continue;
        float v[GROUP];
        _mm512_storeu_ps(v, acc[r]);
        for (; m; m &= (__mmask16)(m - 1)) {
            int i = __builtin_ctz(m);
            if (v[i] > vals[k - 1]) keep_best(vals, ids, k, v[i], (int32_t)(g * GROUP + i));
        }
    }
}

typedef struct {
    const rl_head *h;
    int n_rows;
    int64_t g0, g1;
    sink to;
} job;

KERNEL static void *run(void *arg) {
    const job *j = arg;
    for (int64_t g = j->g0; g < j->g1; g++) {
        int r = 0;
        for (; r + TILE <= j->n_rows; r += TILE) tile(j->h, g, r, TILE, &j->to);
        switch (j->n_rows - r) { /* constant tile heights keep the accumulators in registers */
            case 7: tile(j->h, g, r, 7, &j->to); break;
            case 6: tile(j->h, g, r, 6, &j->to); break;
            case 5: tile(j->h, g, r, 5, &j->to); break;
            case 4: tile(j->h, g, r, 4, &j->to); break;
            case 3: tile(j->h, g, r, 3, &j->to); break;
            case 2: tile(j->h, g, r, 2, &j->to); break;
            case 1: tile(j->h, g, r, 1, &j->to); break;
            default: break;
        }
    }
    return NULL;
}
#endif

#define MAX_THREADS 256

/* The kernel over n_rows hidden states x, split by vocabulary groups across n_threads: logits
 * into out, or (out NULL) each row's best k into ids and vals, each job keeping its own. */
static int compute(rl_head *h, const float *x, int n_rows, int n_threads, float *out, int k, int32_t *ids,
                   float *vals) {
#ifndef RL_HEAD_X86
    (void)h, (void)x, (void)n_rows, (void)n_threads, (void)out, (void)k, (void)ids, (void)vals;
    return RL_EINVAL;
#else
    if (n_rows < 1 || n_rows > h->max_rows || n_threads < 1) return RL_EINVAL;
    if (!out && (k < 1 || k > RL_HEAD_MAX_K || k > h->n_vocab)) return RL_EINVAL;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > h->n_groups) n_threads = (int)h->n_groups;
    size_t per_job = out ? 0 : (size_t)n_rows * k;
    float *job_vals = out ? NULL : malloc(per_job * n_threads * sizeof *job_vals);
    int32_t *job_ids = out ? NULL : malloc(per_job * n_threads * sizeof *job_ids);
    if (!out && (!job_vals || !job_ids)) {
        free(job_vals);
        free(job_ids);
        return RL_ENOMEM;
    }
    for (size_t i = 0; i < per_job * n_threads; i++) job_vals[i] = -INFINITY, job_ids[i] = -1;
    quantize_rows(h, x, n_rows);
    job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started = 1;
    for (int t = 0; t < n_threads; t++)
        jobs[t] = (job){h, n_rows, h->n_groups * t / n_threads, h->n_groups * (t + 1) / n_threads,
                        {out, out ? NULL : job_vals + per_job * t, out ? NULL : job_ids + per_job * t, k}};
    for (int t = 1; t < n_threads; t++, started++)
        if (pthread_create(&threads[t], NULL, run, &jobs[t]) != 0) break;
    for (int t = started; t < n_threads; t++) run(&jobs[t]); /* threads refused: do their share here */
    run(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
    if (out) return RL_OK;
    int rc = RL_OK; /* merged job by job: a later job's ids are all larger, so ties keep the earlier */
    memcpy(vals, job_vals, per_job * sizeof *vals);
    memcpy(ids, job_ids, per_job * sizeof *ids);
    for (int t = 1; t < n_threads; t++) {
        for (size_t i = 0; i < per_job; i++) {
            float *v = vals + i / k * k;
            int32_t *id = ids + i / k * k;
            const float got = job_vals[per_job * t + i];
            if (job_ids[per_job * t + i] >= 0 && got > v[k - 1]) keep_best(v, id, k, got, job_ids[per_job * t + i]);
        }
    }
    for (int r = 0; r < n_rows; r++)
        if (ids[(size_t)r * k + k - 1] < 0) rc = RL_EINVAL; /* fewer than k logits above -inf: NaN or -inf */
    free(job_vals);
    free(job_ids);
    return rc;
#endif
}

int rl_head_logits_of(rl_head *h, const float *x, int n_rows, int n_threads, float *out) {
    return out ? compute(h, x, n_rows, n_threads, out, 0, NULL, NULL) : RL_EINVAL;
}

int rl_head_logits(rl_head *h, int n_threads, float *out) {
    if (h->captured < 1) return RL_EINVAL;
    return rl_head_logits_of(h, h->hidden, h->captured, n_threads, out);
}

int rl_head_top_k_of(rl_head *h, const float *x, int n_rows, int n_threads, int k, int32_t *ids, float *vals) {
    return ids && vals ? compute(h, x, n_rows, n_threads, NULL, k, ids, vals) : RL_EINVAL;
}

int rl_head_top_k(rl_head *h, int n_threads, int k, int32_t *ids, float *vals) {
    if (h->captured < 1) return RL_EINVAL;
    return rl_head_top_k_of(h, h->hidden, h->captured, n_threads, k, ids, vals);
}
