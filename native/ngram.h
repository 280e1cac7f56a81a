/* ngram.h - the RACER retrieval index and a top-k over logits rows: this header is the spec.
 *
 * What it does: an n-gram trie over one token stream that can only be appended to, with counts,
 * an LRU node cap, and retrieval of the most frequent continuations after a given next token.
 * racer_local/ngram.py holds a pure-Python twin that must give identical results for the same
 * calls (tests/test_ngram.py checks this on seeded random op streams).
 * What it leaves out: fail links (the active set below is the exact set of matched suffixes,
 * so none are needed), threads (one index per thread), persistence, drafting trees.
 *
 * THE TRIE. The stream s[0..n) of token ids (int32 in [0, 2^31)) is indexed as the trie of all
 * its n-grams of length 1..window. The root stands for the empty n-gram; a node at depth d is
 * one d-gram and `count` is how often it occurred in the stream (since it was last created).
 * Invariant: a child's count is <= its parent's, because every occurrence of an n-gram ends
 * one token after an occurrence of its prefix.
 *
 * THE ACTIVE SET. active[k] is the node of the suffix of length k of the stream, for
 * k = 0 .. min(n, window-1); active[0] is the root. Appending token t visits k in increasing
 * order: the child of active[k] for t gets count+1 (and is created if absent); then
 * active = [root] + those children whose depth is < window. This reads only the new tokens,
 * O(window) per token, and the active nodes always exist (they were just touched).
 *
 * TOUCHES AND EVICTION. A global clock starts at 0. A node is "touched" when it is created or its
 * count is incremented (both happen together when it is created): the clock is incremented and
 * stamped on it. Retrieval touches nothing. The root is never evicted and is never stamped.
 * Before appending each token, step_start := clock + 1, having saved the old value as
 * prev_step_start (both start at 0). When a node must be created and node_count == max_nodes,
 * the evicted node is the one with the smallest stamp among nodes that have no children and
 * stamp < prev_step_start, i.e. the least recently touched leaf not touched in this token's
 * step or the previous one. Only leaves go, so no subtree is orphaned; the active nodes were
 * touched in the previous step, so they stay. The nodes this protects (touched in the last two
 * steps, plus their ancestors) are n-grams of the last window+1 tokens: at most
 * window*(window+3)/2 of them besides the root. Hence max_nodes must be at least
 * RL_MIN_NODES(window) = (window+1)*(window+2)/2 + 1, which guarantees that a leaf can be
 * evicted whenever one is needed.
 *
 * RETRIEVAL. Given the next token `root` (known, not yet in the stream), the "borders" are the
 * nodes suffix+[root] where suffix is an active node of depth >= min_match-1, i.e. the matched
 * suffixes ending in root with depth >= min_match. A continuation is a nonempty token sequence
 * c; it is present under border b when b+c is a trie node. Its score is the sum, over every
 * border it is present under, of the count of b+c. So every earlier occurrence of root+c counts
 * once per border it falls under: it is weighted by the length L of the context it shares with
 * the current one, as max(0, min(L, window-|c|-1) - min_match + 2). Why this rule: a longer, more
 * specific match wins at equal frequency, yet a phrase seen often still beats one seen once
 * with a long match; one number ranks continuations from all borders together, so a path seen
 * through two borders takes one slot, not two (the reference ranks (node, border) pairs by raw
 * count and spends budget on such duplicates); and a score never grows when c is extended, so
 * the best continuations form a prefix-closed tree that a best-first search finds exactly.
 * Best-first search: candidates are ordered by (score desc, rank of the parent asc, token asc),
 * a total order, where the children of the root have parent rank -1 and a kept candidate's rank
 * is its position in the kept list. Popping the best candidate appends it to the kept list and
 * pushes its children, until `budget` candidates are kept or none remain. (Pushing only the
 * best budget-minus-kept children of a node gives the same result: the others can never be
 * popped.) The result lists the kept nodes in rank order (a parent before its children) and
 * the leaves of the kept tree ordered by (score desc, token path asc, compared as sequences).
 * An empty stream, no border, or budget 0 gives nothing.
 *
 * TOP-K. rl_topk_rows orders each row of logits by (value desc, column asc), NaN counting as
 * -inf, and keeps the first k columns: one pass per row with a sorted buffer of k entries.
 *
 * All functions returning int give RL_OK (0) or a negative RL_E* code; none prints or exits.
 */
#ifndef RL_NGRAM_H
#define RL_NGRAM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    RL_OK = 0,
    RL_ENOMEM = -1, /* an allocation failed; the index is still consistent (see rl_index_extend) */
    RL_EINVAL = -2, /* an argument is out of range */
    RL_EFULL = -3,  /* no leaf could be evicted: cannot happen when max_nodes >= RL_MIN_NODES */
};

#define RL_MAX_WINDOW 256          /* keeps the per-token cost and the pinned node set small */
#define RL_MAX_NODES (1 << 30)     /* node ids are int32 and the hash table doubles */
#define RL_MIN_NODES(window) (((int64_t)(window) + 1) * ((window) + 2) / 2 + 1)

typedef struct rl_index rl_index;

/* One kept continuation node of a retrieval (see RETRIEVAL above). */
typedef struct {
    int32_t token;
    int32_t parent; /* index of the parent in the same array; -1 when the parent is `root` */
    int32_t depth;  /* tokens after `root`: 1 for the children of root */
    int64_t score;
} rl_draft_node;

/* NULL when the parameters are valid, otherwise a message saying which is not:
 * 1 <= window <= RL_MAX_WINDOW, 1 <= min_match <= window,
 * RL_MIN_NODES(window) <= max_nodes <= RL_MAX_NODES. */
const char *rl_check_params(int64_t window, int64_t max_nodes, int64_t min_match);

/* A new empty index, or NULL (bad parameters or out of memory). Memory grows with the node
 * count, up to about 64 bytes a node. */
rl_index *rl_index_new(int window, int32_t max_nodes, int min_match);
void rl_index_free(rl_index *idx); /* NULL is fine */

/* Forgets the stream and every node but the root, and restarts the clock. */
void rl_index_reset(rl_index *idx);

/* Appends tokens[0..n): each must be in [0, 2^31) (RL_EINVAL before anything is appended).
 * On RL_ENOMEM the tokens before the failing one are appended and the index is consistent. */
int rl_index_extend(rl_index *idx, const int32_t *tokens, size_t n);

int64_t rl_index_n_tokens(const rl_index *idx); /* tokens appended since the last reset */
int32_t rl_index_node_count(const rl_index *idx); /* live nodes, the root included */

/* The best continuations after `root` (see RETRIEVAL). Writes the kept nodes to nodes[0..m),
 * m <= min(budget, node_count - 1), in rank order, and the indices of the kept tree's leaves
 * to leaves[0..*n_leaves) in result order; both arrays need room for min(budget,
 * node_count - 1) entries. Returns m (0 when there is nothing to draft) or a negative RL_E*.
 * It keeps scratch buffers in the index, so it is not const; the trie is not changed. */
int rl_index_retrieve(rl_index *idx, int32_t root, int budget, rl_draft_node *nodes,
                      int32_t *leaves, int *n_leaves);

/* For each of n_rows rows of n_cols floats (row-major, contiguous), writes the k columns
 * ordered by (value desc, column asc), NaN as -inf, to out[row*k .. row*k + k).
 * Needs 1 <= k <= n_cols (else RL_EINVAL); RL_ENOMEM if its k-float buffer cannot be had. */
int rl_topk_rows(const float *logits, size_t n_rows, size_t n_cols, int k, int32_t *out);

#ifdef __cplusplus
}
#endif

#endif /* RL_NGRAM_H */
