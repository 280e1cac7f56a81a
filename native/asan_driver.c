/* asan_driver.c - replays a scripted op stream from stdin against ngram.c and prints results,
 * so tests/test_ngram.py can run ngram.c under AddressSanitizer/UBSan and compare its output
 * with the Python twin's. Test-only: not part of the extension module.
 *
 * Input: "window max_nodes min_match", then ops, whitespace-separated:
 *   e n t1 .. tn            extend          -> "E <len> <node_count>"
 *   r root budget           retrieve        -> "R <n_paths>", then "<score> t1 .. td" per path
 *   t rows cols k v1 .. vN  topk_rows       -> "T <rows>", then "id1 .. idk" per row
 *   x                       reset           -> "X"
 * Leaves out: error recovery; any bad input or failed call exits 1 with file:line.
 */
#include <stdio.h>
#include <stdlib.h>

#include "ngram.h"

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static long long read_int(void) {
    long long v;
    CHECK(scanf("%lld", &v) == 1);
    return v;
}

static float read_float(void) {
    char word[64];
    CHECK(scanf("%63s", word) == 1);
    char *end;
    float v = strtof(word, &end); /* accepts "nan", "inf", "-inf" */
    CHECK(*end == '\0');
    return v;
}

static void do_retrieve(rl_index *idx) {
    int32_t root = (int32_t)read_int();
    int budget = (int)read_int();
    int cap = rl_index_node_count(idx) - 1;
    if (budget < cap) cap = budget;
    rl_draft_node *nodes = malloc((size_t)(cap > 0 ? cap : 1) * sizeof *nodes);
    int32_t *leaves = malloc((size_t)(cap > 0 ? cap : 1) * sizeof *leaves);
    CHECK(nodes && leaves);
    int n_leaves = 0;
    CHECK(rl_index_retrieve(idx, root, cap, nodes, leaves, &n_leaves) >= 0);
    printf("R %d\n", n_leaves);
    for (int j = 0; j < n_leaves; j++) {
        int32_t path[RL_MAX_WINDOW];
        int32_t leaf = leaves[j], d = nodes[leaf].depth;
        CHECK(d >= 1 && d <= RL_MAX_WINDOW);
        for (int32_t i = leaf, k = d; i >= 0; i = nodes[i].parent) path[--k] = nodes[i].token;
        printf("%lld", (long long)nodes[leaf].score);
        for (int32_t k = 0; k < d; k++) printf(" %d", (int)path[k]);
        printf("\n");
    }
    free(nodes);
    free(leaves);
}

static void do_topk(void) {
    size_t rows = (size_t)read_int(), cols = (size_t)read_int();
    int k = (int)read_int();
    float *logits = malloc((rows * cols > 0 ? rows * cols : 1) * sizeof *logits);
    int32_t *out = malloc((rows * (size_t)k > 0 ? rows * (size_t)k : 1) * sizeof *out);
    CHECK(logits && out);
    for (size_t i = 0; i < rows * cols; i++) logits[i] = read_float();
    CHECK(rl_topk_rows(logits, rows, cols, k, out) == RL_OK);
    printf("T %zu\n", rows);
    for (size_t r = 0; r < rows; r++)
        for (int j = 0; j < k; j++) printf(j + 1 < k ? "%d " : "%d\n", (int)out[r * (size_t)k + j]);
    free(logits);
    free(out);
}

int main(void) {
    long long window = read_int(), max_nodes = read_int(), min_match = read_int();
    CHECK(rl_check_params(window, max_nodes, min_match) == NULL);
    rl_index *idx = rl_index_new((int)window, (int32_t)max_nodes, (int)min_match);
    CHECK(idx);
    char op[8];
    while (scanf("%7s", op) == 1) {
        switch (op[0]) {
        case 'e': {
            size_t n = (size_t)read_int();
            int32_t *tokens = malloc((n > 0 ? n : 1) * sizeof *tokens);
            CHECK(tokens);
            for (size_t i = 0; i < n; i++) tokens[i] = (int32_t)read_int();
            CHECK(rl_index_extend(idx, tokens, n) == RL_OK);
            free(tokens);
            printf("E %lld %d\n", (long long)rl_index_n_tokens(idx), (int)rl_index_node_count(idx));
            break;
        }
        case 'r': do_retrieve(idx); break;
        case 't': do_topk(); break;
        case 'x': rl_index_reset(idx); printf("X\n"); break;
        default: CHECK(!"unknown op");
        }
    }
    rl_index_free(idx);
    return 0;
}
