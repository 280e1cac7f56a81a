/* ngram.c - the RACER retrieval index and top-k over logits rows; ngram.h is the spec.
 *
 * Nodes live in one growable array and are found by a hash table keyed by (parent, token), so a
 * node costs the same whatever the vocabulary; each node also links its children (for
 * retrieval) and sits in a doubly linked LRU list ordered by stamp (for eviction).
 * Leaves out: fail links, threads, persistence, and any Python (that is module.c).
 */
#include "ngram.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NIL (-1)

typedef struct {
    int32_t token, parent, depth;
    int32_t first_child, next_sibling, prev_sibling; /* children, in no particular order */
    int32_t lru_prev, lru_next;                      /* oldest stamp at lru_head */
    int64_t count;
    uint64_t stamp;
} node_t;

/* A retrieval candidate: a continuation and the trie nodes (one per border it is present
 * under) that stand for it, stored as pool[pool_off .. pool_off + pool_len). */
typedef struct {
    int64_t score;
    int32_t parent_rank, token, depth, pool_off, pool_len;
} cand_t;

typedef struct { int32_t token, node; int64_t count; } child_t;
typedef struct { int64_t score; const int32_t *path; int32_t len, index; } leaf_t;

struct rl_index {
    int window, min_match;
    int32_t max_nodes;
    int64_t n_tokens;
    uint64_t clock, step_start, prev_step_start;

    node_t *nodes;                 /* nodes[0] is the root */
    int32_t nodes_cap, n_used, n_live, free_head; /* free nodes chain through next_sibling */
    int32_t lru_head, lru_tail;
    int32_t *slots;                /* open addressing, linear probing; NIL = empty */
    uint32_t slot_mask;

    int32_t *active, *next_active; /* window entries each */
    int n_active;

    /* retrieval scratch, reused across calls */
    cand_t *cands; size_t cands_cap; size_t n_cands;
    int32_t *heap; size_t heap_cap; size_t heap_len;
    int32_t *pool; size_t pool_cap; size_t pool_len;
    child_t *kids; size_t kids_cap;
    leaf_t *leafs; size_t leafs_cap;
    int32_t *paths; size_t paths_cap;
};

/* Grows *buf to hold at least `need` elements of `size` bytes; 0 or RL_ENOMEM. */
static int reserve(void **buf, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return RL_OK;
    size_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    void *p = realloc(*buf, n * size);
    if (!p) return RL_ENOMEM;
    *buf = p;
    *cap = n;
    return RL_OK;
}
#define RESERVE(field, need) reserve((void **)&idx->field, &idx->field##_cap, (need), sizeof *idx->field)

const char *rl_check_params(int64_t window, int64_t max_nodes, int64_t min_match) {
    if (window < 1 || window > RL_MAX_WINDOW) return "window must be between 1 and 256";
    if (min_match < 1 || min_match > window) return "min_match must be between 1 and window";
    if (max_nodes < RL_MIN_NODES(window))
        return "max_nodes must be at least (window+1)*(window+2)/2 + 1, "
               "so that eviction always finds a leaf";
    if (max_nodes > RL_MAX_NODES) return "max_nodes must be at most 2**30";
    return NULL;
}

/* ---- hash table of children, keyed by (parent, token) ---- */

static uint32_t hash_key(int32_t parent, int32_t token) {
    uint64_t h = ((uint64_t)(uint32_t)parent << 32) | (uint32_t)token;
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return (uint32_t)h;
}

static int32_t find_child(const rl_index *idx, int32_t parent, int32_t token) {
    uint32_t i = hash_key(parent, token) & idx->slot_mask;
    for (;; i = (i + 1) & idx->slot_mask) {
        int32_t n = idx->slots[i];
        if (n == NIL) return NIL;
        if (idx->nodes[n].parent == parent && idx->nodes[n].token == token) return n;
    }
}

static void slot_insert(rl_index *idx, int32_t n) {
    uint32_t i = hash_key(idx->nodes[n].parent, idx->nodes[n].token) & idx->slot_mask;
    while (idx->slots[i] != NIL) i = (i + 1) & idx->slot_mask;
    idx->slots[i] = n;
}

/* Backward-shift deletion: keeps every probe chain unbroken without tombstones. */
static void slot_remove(rl_index *idx, int32_t n) {
    uint32_t mask = idx->slot_mask;
    uint32_t i = hash_key(idx->nodes[n].parent, idx->nodes[n].token) & mask;
    while (idx->slots[i] != n) i = (i + 1) & mask;
    for (uint32_t j = (i + 1) & mask; idx->slots[j] != NIL; j = (j + 1) & mask) {
        int32_t m = idx->slots[j];
        uint32_t home = hash_key(idx->nodes[m].parent, idx->nodes[m].token) & mask;
        /* m may fill the hole at i unless its home lies cyclically in (i, j] */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            idx->slots[i] = m;
            i = j;
        }
    }
    idx->slots[i] = NIL;
}

static int rehash(rl_index *idx, uint32_t n_slots) {
    int32_t *slots = malloc((size_t)n_slots * sizeof *slots);
    if (!slots) return RL_ENOMEM;
    for (uint32_t i = 0; i < n_slots; i++) slots[i] = NIL;
    free(idx->slots);
    idx->slots = slots;
    idx->slot_mask = n_slots - 1;
    for (int32_t n = 1; n < idx->n_used; n++)
        if (idx->nodes[n].depth > 0) slot_insert(idx, n); /* free nodes have depth 0 */
    return RL_OK;
}

/* Room for `extra` more live nodes without any allocation, load factor <= 1/2. */
static int reserve_nodes(rl_index *idx, int32_t extra) {
    int64_t need = (int64_t)idx->n_live + extra;
    if (need > idx->max_nodes) need = idx->max_nodes;
    if (need > idx->nodes_cap) {
        int64_t cap = idx->nodes_cap;
        while (cap < need) cap *= 2;
        if (cap > idx->max_nodes) cap = idx->max_nodes;
        node_t *p = realloc(idx->nodes, (size_t)cap * sizeof *p);
        if (!p) return RL_ENOMEM;
        idx->nodes = p;
        idx->nodes_cap = (int32_t)cap;
    }
    if ((uint64_t)need * 2 > (uint64_t)idx->slot_mask + 1) {
        uint64_t n_slots = (uint64_t)idx->slot_mask + 1;
        while ((uint64_t)need * 2 > n_slots) n_slots *= 2;
        return rehash(idx, (uint32_t)n_slots);
    }
    return RL_OK;
}

/* ---- LRU list, ordered by stamp ---- */

static void lru_unlink(rl_index *idx, int32_t n) {
    node_t *x = &idx->nodes[n];
    if (x->lru_prev != NIL) idx->nodes[x->lru_prev].lru_next = x->lru_next; else idx->lru_head = x->lru_next;
    if (x->lru_next != NIL) idx->nodes[x->lru_next].lru_prev = x->lru_prev; else idx->lru_tail = x->lru_prev;
}

static void lru_append(rl_index *idx, int32_t n) {
    node_t *x = &idx->nodes[n];
    x->lru_prev = idx->lru_tail;
    x->lru_next = NIL;
    if (idx->lru_tail != NIL) idx->nodes[idx->lru_tail].lru_next = n; else idx->lru_head = n;
    idx->lru_tail = n;
}

/* ---- nodes ---- */

static void evict(rl_index *idx, int32_t n) {
    node_t *x = &idx->nodes[n];
    lru_unlink(idx, n);
    slot_remove(idx, n);
    if (x->prev_sibling != NIL) idx->nodes[x->prev_sibling].next_sibling = x->next_sibling;
    else idx->nodes[x->parent].first_child = x->next_sibling;
    if (x->next_sibling != NIL) idx->nodes[x->next_sibling].prev_sibling = x->prev_sibling;
    x->depth = 0;
    x->next_sibling = idx->free_head;
    idx->free_head = n;
    idx->n_live--;
}

/* The least recently touched leaf not touched in this step or the previous one. The scan is
 * short: a node is touched at most ~2*window stamps before its newest child, so leaves sit near
 * the old end of the list. */
static int32_t eviction_victim(const rl_index *idx) {
    for (int32_t n = idx->lru_head; n != NIL; n = idx->nodes[n].lru_next) {
        if (idx->nodes[n].stamp >= idx->prev_step_start) return NIL; /* stamps only grow from here */
        if (idx->nodes[n].first_child == NIL) return n;
    }
    return NIL;
}

/* Creates the child of `parent` for `token`; capacity was reserved by reserve_nodes. */
static int32_t new_child(rl_index *idx, int32_t parent, int32_t token) {
    if (idx->n_live == idx->max_nodes) {
        int32_t victim = eviction_victim(idx);
        if (victim == NIL) return RL_EFULL;
        evict(idx, victim);
    }
    int32_t n;
    if (idx->free_head != NIL) {
        n = idx->free_head;
        idx->free_head = idx->nodes[n].next_sibling;
    } else {
        n = idx->n_used++;
    }
    node_t *x = &idx->nodes[n];
    node_t *p = &idx->nodes[parent];
    x->token = token;
    x->parent = parent;
    x->depth = p->depth + 1;
    x->first_child = NIL;
    x->prev_sibling = NIL;
    x->next_sibling = p->first_child;
    if (p->first_child != NIL) idx->nodes[p->first_child].prev_sibling = n;
    p->first_child = n;
    x->count = 0;
    x->stamp = 0;
    lru_append(idx, n);
    slot_insert(idx, n);
    idx->n_live++;
    return n;
}

static void touch(rl_index *idx, int32_t n) {
    idx->nodes[n].count++;
    idx->nodes[n].stamp = ++idx->clock;
    lru_unlink(idx, n);
    lru_append(idx, n);
}

/* ---- public: lifetime ---- */

void rl_index_reset(rl_index *idx) {
    node_t *root = &idx->nodes[0];
    memset(root, 0, sizeof *root);
    root->parent = root->first_child = root->next_sibling = root->prev_sibling = NIL;
    root->lru_prev = root->lru_next = NIL;
    idx->n_used = idx->n_live = 1;
    idx->free_head = NIL;
    idx->lru_head = idx->lru_tail = NIL;
    for (uint32_t i = 0; i <= idx->slot_mask; i++) idx->slots[i] = NIL;
    idx->active[0] = 0;
    idx->n_active = 1;
    idx->n_tokens = 0;
    idx->clock = idx->step_start = idx->prev_step_start = 0;
}

rl_index *rl_index_new(int window, int32_t max_nodes, int min_match) {
    if (rl_check_params(window, max_nodes, min_match)) return NULL;
    rl_index *idx = calloc(1, sizeof *idx);
    if (!idx) return NULL;
    idx->window = window;
    idx->max_nodes = max_nodes;
    idx->min_match = min_match;
    idx->nodes_cap = 64 < max_nodes ? 64 : max_nodes;
    idx->nodes = malloc((size_t)idx->nodes_cap * sizeof *idx->nodes);
    idx->slot_mask = 127;
    idx->slots = malloc((size_t)(idx->slot_mask + 1) * sizeof *idx->slots);
    idx->active = malloc((size_t)window * sizeof *idx->active);
    idx->next_active = malloc((size_t)window * sizeof *idx->next_active);
    if (!idx->nodes || !idx->slots || !idx->active || !idx->next_active) {
        rl_index_free(idx);
        return NULL;
    }
    rl_index_reset(idx);
    return idx;
}

void rl_index_free(rl_index *idx) {
    if (!idx) return;
    free(idx->nodes);
    free(idx->slots);
    free(idx->active);
    free(idx->next_active);
    free(idx->cands);
    free(idx->heap);
    free(idx->pool);
    free(idx->kids);
    free(idx->leafs);
    free(idx->paths);
    free(idx);
}

int64_t rl_index_n_tokens(const rl_index *idx) { return idx->n_tokens; }
int32_t rl_index_node_count(const rl_index *idx) { return idx->n_live; }

/* ---- public: extend ---- */

int rl_index_extend(rl_index *idx, const int32_t *tokens, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0) return RL_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (reserve_nodes(idx, idx->window) != RL_OK) return RL_ENOMEM;
        idx->prev_step_start = idx->step_start;
        idx->step_start = idx->clock + 1;
        int n_next = 0;
        idx->next_active[n_next++] = 0;
        for (int k = 0; k < idx->n_active; k++) {
            int32_t c = find_child(idx, idx->active[k], tokens[i]);
            if (c == NIL) c = new_child(idx, idx->active[k], tokens[i]);
            if (c < 0) return c; /* RL_EFULL: impossible with valid parameters */
            touch(idx, c);
            if (idx->nodes[c].depth < idx->window) idx->next_active[n_next++] = c;
        }
        int32_t *t = idx->active;
        idx->active = idx->next_active;
        idx->next_active = t;
        idx->n_active = n_next;
        idx->n_tokens++;
    }
    return RL_OK;
}

/* ---- public: retrieve ---- */

/* Heap order: a before b when a has the higher score, then the lower parent rank, then the lower
 * token. No two candidates share (parent rank, token), so this is a total order. */
static int cand_before(const cand_t *a, const cand_t *b) {
    if (a->score != b->score) return a->score > b->score;
    if (a->parent_rank != b->parent_rank) return a->parent_rank < b->parent_rank;
    return a->token < b->token;
}

static void heap_push(rl_index *idx, int32_t c) {
    size_t i = idx->heap_len++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!cand_before(&idx->cands[c], &idx->cands[idx->heap[up]])) break;
        idx->heap[i] = idx->heap[up];
        i = up;
    }
    idx->heap[i] = c;
}

static int32_t heap_pop(rl_index *idx) {
    int32_t top = idx->heap[0];
    int32_t last = idx->heap[--idx->heap_len];
    size_t i = 0, n = idx->heap_len;
    for (;;) {
        size_t best = 2 * i + 1;
        if (best >= n) break;
        if (best + 1 < n && cand_before(&idx->cands[idx->heap[best + 1]], &idx->cands[idx->heap[best]])) best++;
        if (!cand_before(&idx->cands[idx->heap[best]], &idx->cands[last])) break;
        idx->heap[i] = idx->heap[best];
        i = best;
    }
    if (n > 0) idx->heap[i] = last;
    return top;
}

static int by_token(const void *a, const void *b) {
    const child_t *x = a, *y = b;
    if (x->token != y->token) return x->token < y->token ? -1 : 1;
    return (x->node > y->node) - (x->node < y->node);
}

static int by_score_then_token(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->token > y->token) - (x->token < y->token);
}

static int by_score_then_path(const void *a, const void *b) {
    const leaf_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    for (int32_t j = 0; j < x->len && j < y->len; j++)
        if (x->path[j] != y->path[j]) return x->path[j] < y->path[j] ? -1 : 1;
    return (x->len > y->len) - (x->len < y->len);
}

/* Pushes the best `keep` children of the continuation whose trie nodes are
 * pool[off .. off+len): children are grouped by token across all those nodes, and a group's
 * score is the sum of their counts. */
static int expand(rl_index *idx, size_t off, size_t len, int32_t rank, int32_t depth, size_t keep) {
    size_t n_kids = 0;
    for (size_t i = 0; i < len; i++) {
        for (int32_t c = idx->nodes[idx->pool[off + i]].first_child; c != NIL; c = idx->nodes[c].next_sibling) {
            if (RESERVE(kids, n_kids + 1)) return RL_ENOMEM;
            idx->kids[n_kids++] = (child_t){idx->nodes[c].token, c, idx->nodes[c].count};
        }
    }
    if (n_kids == 0) return RL_OK;
    qsort(idx->kids, n_kids, sizeof *idx->kids, by_token);

    /* One candidate per run of equal tokens, appended after the existing candidates; until it
     * is kept, its pool_off points into kids. */
    size_t base = idx->n_cands, n_groups = 0;
    for (size_t s = 0, e; s < n_kids; s = e) {
        int64_t score = 0;
        for (e = s; e < n_kids && idx->kids[e].token == idx->kids[s].token; e++) score += idx->kids[e].count;
        if (RESERVE(cands, base + n_groups + 1)) return RL_ENOMEM;
        idx->cands[base + n_groups++] = (cand_t){score, rank, idx->kids[s].token, depth, (int32_t)s, (int32_t)(e - s)};
    }
    if (n_groups > keep) {
        qsort(idx->cands + base, n_groups, sizeof *idx->cands, by_score_then_token);
        n_groups = keep;
    }
    if (RESERVE(heap, idx->heap_len + n_groups)) return RL_ENOMEM;
    for (size_t g = 0; g < n_groups; g++) {
        cand_t *c = &idx->cands[base + g];
        if (RESERVE(pool, idx->pool_len + (size_t)c->pool_len)) return RL_ENOMEM;
        for (int32_t i = 0; i < c->pool_len; i++) idx->pool[idx->pool_len + i] = idx->kids[c->pool_off + i].node;
        c->pool_off = (int32_t)idx->pool_len;
        idx->pool_len += (size_t)c->pool_len;
        heap_push(idx, (int32_t)(base + g));
    }
    idx->n_cands = base + n_groups;
    return RL_OK;
}

/* Orders the leaves of the kept tree nodes[0..m) by (score desc, path asc) into leaves. */
static int sort_leaves(rl_index *idx, const rl_draft_node *nodes, int m, int32_t *leaves, int *n_leaves) {
    if (m == 0) return RL_OK; /* qsort must not see the still-NULL buffers */
    for (int i = 0; i < m; i++) leaves[i] = 1; /* used as "is a leaf" flags first */
    for (int i = 0; i < m; i++)
        if (nodes[i].parent >= 0) leaves[nodes[i].parent] = 0;
    size_t n = 0, path_len = 0;
    for (int i = 0; i < m; i++)
        if (leaves[i]) { n++; path_len += (size_t)nodes[i].depth; }
    if (RESERVE(leafs, n) || RESERVE(paths, path_len)) return RL_ENOMEM;
    n = 0;
    path_len = 0;
    for (int i = 0; i < m; i++) {
        if (!leaves[i]) continue;
        int32_t *path = idx->paths + path_len;
        for (int32_t j = i, d = nodes[i].depth; j >= 0; j = nodes[j].parent) path[--d] = nodes[j].token;
        idx->leafs[n++] = (leaf_t){nodes[i].score, path, nodes[i].depth, i};
        path_len += (size_t)nodes[i].depth;
    }
    qsort(idx->leafs, n, sizeof *idx->leafs, by_score_then_path);
    for (size_t j = 0; j < n; j++) leaves[j] = idx->leafs[j].index;
    *n_leaves = (int)n;
    return RL_OK;
}

int rl_index_retrieve(rl_index *idx, int32_t root, int budget, rl_draft_node *nodes,
                      int32_t *leaves, int *n_leaves) {
    *n_leaves = 0;
    if (root < 0 || budget < 0) return RL_EINVAL;
    int limit = budget < idx->n_live - 1 ? budget : idx->n_live - 1;
    if (idx->n_tokens == 0 || limit == 0) return 0;

    /* the borders: active[k] + [root] with depth >= min_match */
    idx->n_cands = idx->heap_len = idx->pool_len = 0;
    if (RESERVE(pool, (size_t)idx->n_active)) return RL_ENOMEM;
    for (int k = 0; k < idx->n_active; k++) {
        if (idx->nodes[idx->active[k]].depth + 1 < idx->min_match) continue;
        int32_t b = find_child(idx, idx->active[k], root);
        if (b != NIL) idx->pool[idx->pool_len++] = b;
    }
    if (idx->pool_len == 0) return 0;

    int rc = expand(idx, 0, idx->pool_len, -1, 1, (size_t)limit);
    int m = 0;
    while (rc == RL_OK && m < limit && idx->heap_len > 0) {
        cand_t c = idx->cands[heap_pop(idx)]; /* a copy: expand may move cands */
        nodes[m] = (rl_draft_node){c.token, c.parent_rank, c.depth, c.score};
        m++;
        if (m < limit) rc = expand(idx, (size_t)c.pool_off, (size_t)c.pool_len, m - 1, c.depth + 1, (size_t)(limit - m));
    }
    if (rc == RL_OK) rc = sort_leaves(idx, nodes, m, leaves, n_leaves);
    return rc == RL_OK ? m : rc;
}

/* ---- public: top-k over rows ---- */

/* Moves (v, id) up from slot pos of the desc-sorted buffer past every strictly smaller value;
 * equal values stay ahead, and they have lower ids because columns arrive in order. */
static void place(float *vals, int32_t *ids, int pos, float v, int32_t id) {
    for (; pos > 0 && vals[pos - 1] < v; pos--) {
        vals[pos] = vals[pos - 1];
        ids[pos] = ids[pos - 1];
    }
    vals[pos] = v;
    ids[pos] = id;
}

int rl_topk_rows(const float *logits, size_t n_rows, size_t n_cols, int k, int32_t *out) {
    if (k < 1 || (size_t)k > n_cols || n_cols > INT32_MAX) return RL_EINVAL;
    float *vals = malloc((size_t)k * sizeof *vals);
    if (!vals) return RL_ENOMEM;
    enum { BLOCK = 64 };
    for (size_t r = 0; r < n_rows; r++) {
        const float *row = logits + r * n_cols;
        int32_t *ids = out + r * (size_t)k;
        for (int j = 0; j < k; j++) {
            float v = row[j] != row[j] ? -INFINITY : row[j]; /* NaN */
            place(vals, ids, j, v, j);
        }
        /* A NaN compares false, so it never beats the worst kept value (at least -inf). */
        float worst = vals[k - 1];
        size_t j = (size_t)k;
        for (; j + BLOCK <= n_cols; j += BLOCK) {
            int hits = 0; /* a branch-free count: GCC and Clang vectorise it; an |= they do not */
            for (int u = 0; u < BLOCK; u++) hits += row[j + u] > worst;
            if (!hits) continue;
            for (int u = 0; u < BLOCK; u++) {
                if (row[j + u] > worst) {
                    place(vals, ids, k - 1, row[j + u], (int32_t)(j + u));
                    worst = vals[k - 1];
                }
            }
        }
        for (; j < n_cols; j++) {
            if (row[j] > worst) {
                place(vals, ids, k - 1, row[j], (int32_t)j);
                worst = vals[k - 1];
            }
        }
    }
    free(vals);
    return RL_OK;
}
