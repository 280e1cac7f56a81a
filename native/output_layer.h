/* output_layer.h - a model's output layer for a batch of rows, on the CPU: this header is the spec.
 *
 * WHY. Verifying a draft tree needs logits for every node, and on a CPU llama.cpp's output
 * layer prices each extra row at nearly the cost of the first: its one-row kernel reads the
 * weights once, but from two rows on its tiled kernel re-decodes each q8_0 block for every
 * row (gemma-3-270m, a 262,144 x 640 q8_0 matrix, 2 threads: about 10 ms for one row, 20 ms for
 * two). Here the weights are repacked once at load so that one 64-byte load serves sixteen
 * vocabulary rows and each load is reused for up to eight batch rows: two rows cost about
 * what one does, sixteen about 1.5x.
 *
 * WHAT. logits[r][v] = sum over blocks b of d_w[v][b] * d_x[r][b] * sum_j q_w[v][b][j] * q_x[r][b][j],
 * the arithmetic of llama.cpp's own q8_0 x q8_0 dot product: the hidden state x[r] is quantized
 * to q8_0 the way ggml's x86 kernel does it (per 32 values: amax, d = amax / 127 rounded to fp16,
 * q = round-half-even(x * 127 / amax)). Only the order of the float additions differs, so
 * logits match llama.cpp's to about 1e-5 (batched and one-row decodes differ as much).
 *
 * CAPTURE. The hidden states come from llama.cpp's own graph: rl_head_eval_callback is a ggml
 * scheduler eval callback (llama_context_params.cb_eval). While armed, it asks for the tensor
 * named "result_norm" (the final norm's output, one row per output token), copies it, and
 * stops the graph there, so llama.cpp's output layer is never run. Disarmed it asks for
 * nothing and the graph runs whole. The ggml accessors are passed in as function pointers, so
 * this file needs no ggml headers.
 *
 * LEAVES OUT: weight types other than q8_0, CPUs without AVX-512 VNNI (rl_head_supported() says),
 * tensors that do not live in host memory (a GPU backend's), and final-logit soft-capping or
 * scaling (the caller checks the model has none and compares a probe against llama.cpp).
 *
 * Functions returning int give RL_OK (0) or a negative RL_E* code (ngram.h); none prints.
 */
#ifndef RL_OUTPUT_LAYER_H
#define RL_OUTPUT_LAYER_H

#include <stdbool.h>
#include <stdint.h>

typedef struct rl_head rl_head;

/* ggml_get_name, ggml_get_data and ggml_nelements, as the library that llama.cpp loaded has them */
typedef const char *(*rl_tensor_name_fn)(const void *tensor);
typedef void *(*rl_tensor_data_fn)(const void *tensor);
typedef int64_t (*rl_tensor_size_fn)(const void *tensor);

int rl_head_supported(void);

/* Repacks `weights` (n_vocab rows of n_embd q8_0 values, llama.cpp's layout; n_embd a multiple
 * of 32) for batches of up to max_rows rows. The weights are not needed afterwards. */
int rl_head_new(const void *weights, int64_t n_vocab, int64_t n_embd, int max_rows,
                rl_tensor_name_fn name, rl_tensor_data_fn data, rl_tensor_size_fn size, rl_head **out);
void rl_head_free(rl_head *head);

/* Arm (capture and stop at the next decode) or disarm; arming forgets the last capture. */
void rl_head_arm(rl_head *head, bool armed);

/* Rows captured by the last armed decode: 0 none, -1 a result_norm that did not fit. */
int rl_head_captured(const rl_head *head);

/* Logits of the captured rows into out (captured x n_vocab floats) with n_threads threads. */
int rl_head_logits(rl_head *head, int n_threads, float *out);

/* Logits of n_rows given hidden states (n_rows x n_embd floats): the same kernel, for tests. */
int rl_head_logits_of(rl_head *head, const float *x, int n_rows, int n_threads, float *out);

/* Each captured row's best k tokens instead (captured x k ids and their logits, best first, ties
 * to the smaller id), kept as the kernel goes, so no row of n_vocab logits is written or read
 * again: greedy verification and the copy-logit table need no more. 1 <= k <= RL_HEAD_MAX_K;
 * RL_EINVAL also where fewer than k of a row's logits are above -inf (NaN or -inf logits). */
#define RL_HEAD_MAX_K 256
int rl_head_top_k(rl_head *head, int n_threads, int k, int32_t *ids, float *vals);
int rl_head_top_k_of(rl_head *head, const float *x, int n_rows, int n_threads, int k, int32_t *ids,
                     float *vals);

bool rl_head_eval_callback(void *tensor, bool ask, void *head);

#endif
