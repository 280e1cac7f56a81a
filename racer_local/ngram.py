"""The RACER retrieval index and a top-k over logits rows, in pure Python.

`PyNgramIndex` and `py_topk_rows` are the twins of the C code in native/ngram.c, whose header
native/ngram.h is the spec: they give identical results, ties and evictions included, and the
tests hold them to it. `NgramIndex` and `topk_rows` are the C versions when
`racer_local._native` imports, else these; RACER_LOCAL_NATIVE=0 forces Python, =1 forces C.
Deliberately left out: drafting trees, the logits table, and any speed tricks that would make
this twin harder to read than the spec.
"""

from __future__ import annotations

import heapq
import operator
import os
import sys
from collections import OrderedDict

import numpy as np

__all__ = ["NATIVE", "NgramIndex", "PyNgramIndex", "py_topk_rows", "topk_rows"]

TOKEN_LIMIT = 2**31
MAX_WINDOW = 256
MAX_NODES = 2**30
LOGITS_TYPE_MSG = (
    "logits must be a C-contiguous 2-D float32 array; "
    "convert with np.ascontiguousarray(x, dtype=np.float32)"
)


def min_nodes(window: int) -> int:
    """Least max_nodes for `window`: the root, plus every n-gram of the last window+1 tokens
    (which eviction must spare), plus one node that can go."""
    return (window + 1) * (window + 2) // 2 + 1


def check_params(window: int, max_nodes: int, min_match: int) -> None:
    """Raise ValueError, with the C version's message, unless the parameters are valid."""
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError("window must be between 1 and 256")
    if not 1 <= min_match <= window:
        raise ValueError("min_match must be between 1 and window")
    if max_nodes < min_nodes(window):
        raise ValueError(
            "max_nodes must be at least (window+1)*(window+2)/2 + 1, "
            "so that eviction always finds a leaf"
        )
    if max_nodes > MAX_NODES:
        raise ValueError("max_nodes must be at most 2**30")


def _token(obj) -> int:
    value = operator.index(obj)
    if not 0 <= value < TOKEN_LIMIT:
        raise ValueError(f"token ids must be in [0, 2**31), got {obj!r}")
    return value


class _Node:
    __slots__ = ("token", "parent", "depth", "children", "count", "stamp")

    def __init__(self, token: int, parent: _Node | None, depth: int):
        self.token = token
        self.parent = parent
        self.depth = depth
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.stamp = 0


class PyNgramIndex:
    """Trie of the stream's n-grams up to `window` long, with counts and an LRU node cap."""

    def __init__(self, window: int = 10, max_nodes: int = 100_000, min_match: int = 2):
        window, max_nodes, min_match = map(operator.index, (window, max_nodes, min_match))
        check_params(window, max_nodes, min_match)
        self.window = window
        self.max_nodes = max_nodes
        self.min_match = min_match
        self.reset()

    def reset(self) -> None:
        """Forget the stream and every node but the root, and restart the clock."""
        self._root = _Node(-1, None, 0)
        self._active = [self._root]  # active[k]: node of the stream's suffix of length k
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # oldest stamp first; no root
        self._n_tokens = 0
        self._clock = self._step_start = self._prev_step_start = 0

    def __len__(self) -> int:
        return self._n_tokens

    @property
    def node_count(self) -> int:
        """Live trie nodes, the root included."""
        return len(self._lru) + 1

    def __repr__(self) -> str:
        return (
            f"PyNgramIndex(window={self.window}, max_nodes={self.max_nodes}, "
            f"min_match={self.min_match}) with {len(self)} tokens, {self.node_count} nodes"
        )

    def extend(self, tokens) -> None:
        """Append token ids; every one is checked before any is appended."""
        tokens = [_token(t) for t in tokens]
        for token in tokens:
            self._prev_step_start, self._step_start = self._step_start, self._clock + 1
            next_active = [self._root]
            for node in self._active:
                child = node.children.get(token)
                if child is None:
                    child = self._new_child(node, token)
                child.count += 1
                self._clock += 1
                child.stamp = self._clock
                self._lru.move_to_end(child)
                if child.depth < self.window:
                    next_active.append(child)
            self._active = next_active
            self._n_tokens += 1

    def _new_child(self, parent: _Node, token: int) -> _Node:
        if self.node_count == self.max_nodes:
            self._evict()
        child = _Node(token, parent, parent.depth + 1)
        parent.children[token] = child
        self._lru[child] = None
        return child

    def _evict(self) -> None:
        """Drop the least recently touched leaf not touched in this step or the previous one;
        only leaves go, so no subtree is orphaned, and the active nodes are spared."""
        for node in self._lru:
            if node.stamp >= self._prev_step_start:
                break  # stamps only grow from here
            if not node.children:
                del self._lru[node]
                del node.parent.children[node.token]
                return
        raise RuntimeError("ngram index: no leaf could be evicted")

    def retrieve(self, root: int, budget: int) -> list[tuple[list[int], int]]:
        """Best continuations after the next token `root` (see ngram.h, RETRIEVAL): the paths
        to the leaves of at most `budget` kept nodes with their scores, by score desc then
        tokens asc. A continuation's score sums its counts under every border it appears in."""
        kept = self.retrieve_nodes(root, budget)
        is_leaf = [True] * len(kept)
        for _, parent, _ in kept:
            if parent >= 0:
                is_leaf[parent] = False
        paths = []
        for i, (_, _, score) in enumerate(kept):
            if is_leaf[i]:
                path = []
                while i >= 0:
                    path.append(kept[i][0])
                    i = kept[i][1]
                paths.append((path[::-1], score))
        paths.sort(key=lambda item: (-item[1], item[0]))
        return paths

    def retrieve_nodes(self, root: int, budget: int) -> list[tuple[int, int, int]]:
        """The same search as retrieve(), as the kept nodes in rank order: (token, parent,
        score) with parent an index into this list (-1: a child of root)."""
        root, budget = _token(root), operator.index(budget)
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        limit = min(budget, self.node_count - 1)
        if self._n_tokens == 0 or limit == 0:
            return []
        borders = [
            node.children[root]
            for node in self._active
            if node.depth + 1 >= self.min_match and root in node.children
        ]
        if not borders:
            return []

        heap: list[tuple[int, int, int, int, list[_Node]]] = []
        self._expand(heap, borders, -1, 1, limit)
        kept: list[tuple[int, int, int]] = []  # (token, parent rank, score)
        while len(kept) < limit and heap:
            neg_score, parent_rank, token, depth, nodes = heapq.heappop(heap)
            kept.append((token, parent_rank, -neg_score))
            if len(kept) < limit:
                self._expand(heap, nodes, len(kept) - 1, depth + 1, limit - len(kept))
        return kept

    @staticmethod
    def _expand(heap: list, nodes: list[_Node], rank: int, depth: int, keep: int) -> None:
        """Push the best `keep` children of a continuation, grouped by token over its nodes
        (one per border); the others could never be popped before the budget runs out."""
        groups: dict[int, list] = {}
        for node in nodes:
            for token, child in node.children.items():
                group = groups.setdefault(token, [0, []])
                group[0] += child.count
                group[1].append(child)
        ranked = ((-score, token, members) for token, (score, members) in groups.items())
        for neg_score, token, members in heapq.nsmallest(keep, ranked, key=lambda g: g[:2]):
            # heap order (score desc, parent rank asc, token asc) is total: entries never tie
            heapq.heappush(heap, (neg_score, rank, token, depth, members))


def _rows(logits, k) -> tuple[np.ndarray, int]:
    """The logits as an (n, vocab) float32 array, checked exactly as the C version does."""
    try:
        view = memoryview(logits)
    except TypeError:
        raise TypeError(LOGITS_TYPE_MSG) from None
    native_f32 = ("f", "=f", "<f" if sys.byteorder == "little" else ">f")
    if view.ndim != 2 or view.format not in native_f32 or not view.c_contiguous:
        raise TypeError(LOGITS_TYPE_MSG)
    k = operator.index(k)
    n_cols = view.shape[1]
    if not 1 <= k <= n_cols:
        raise ValueError(f"k must be between 1 and the row length {n_cols}, got {k}")
    return np.asarray(view), k


def py_topk_rows(logits, k: int) -> np.ndarray:
    """Top-k column ids of each row, as int32 (n, k), by value desc then id asc, NaN as -inf.
    A partition finds the k-th value; only the columns at or above it are sorted."""
    rows, k = _rows(logits, k)
    n_cols = rows.shape[1]
    out = np.empty((rows.shape[0], k), dtype=np.int32)
    for r, row in enumerate(rows):
        if np.isnan(row).any():
            row = np.where(np.isnan(row), np.float32(-np.inf), row)
        kth = np.partition(row, n_cols - k)[n_cols - k]
        above = np.flatnonzero(row > kth)
        ties = np.flatnonzero(row == kth)[: k - len(above)]
        ids = np.concatenate([above, ties])
        out[r] = ids[np.lexsort((ids, -row[ids]))]
    return out


def _select():
    mode = os.environ.get("RACER_LOCAL_NATIVE", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"RACER_LOCAL_NATIVE must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return False, PyNgramIndex, py_topk_rows
    try:
        from racer_local import _native
    except ImportError as exc:
        if mode == "1":
            raise ImportError(
                "RACER_LOCAL_NATIVE=1 but the C extension racer_local._native is not built "
                f"({exc}); reinstall the package with a C compiler, or unset the variable"
            ) from exc
        return False, PyNgramIndex, py_topk_rows
    return True, _native.NgramIndex, _native.topk_rows


NATIVE: bool  # True when NgramIndex and topk_rows are the C versions
NATIVE, NgramIndex, topk_rows = _select()
