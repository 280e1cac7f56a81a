"""RACER: one draft tree from retrieval (n-gram index) and copy-logits (the model's own top-k).

Every candidate child of a tree node comes from one or both sources:
- retrieval: continuations seen after the context's matched suffixes (ngram.NgramIndex);
- logits: `table[token]`, the target's top-k after the last place `token` was an input,
  refreshed from every verified node, rejected ones included.
Each candidate gets a calibrated probability of being accepted given its parent was: the
acceptance rate observed so far for candidates of its kind (which sources proposed it, at
what rank and logit gap, with what count), starting from a weak prior. A best-first search
then grows the tree by path probability, and the tree size N is the one that maximises
expected tokens per second, (1 + sum of the first N-1 path probabilities) / cost(N), on the
measured cost curve: when drafts keep failing it shrinks to the root alone, plain decoding.

Seeding the table from the prompt costs a full vocabulary projection per prompt position
(about 4 ms each for gemma-3-270m's 262k vocabulary on 2 CPU cores). Measured side by side on
Spec-Bench dev prompts, seeding from the last 16 positions cost 0.1 s of prefill and bought no
acceptance, so by default only the last position (which the prefill computes anyway) seeds
it; `prompt_rows` bounds the choice. Left out: the reference's fixed halving-breadth tree,
which the calibrated best-first search replaces.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

import numpy as np

from racer_local.costmodel import CostCurve
from racer_local.drafters.base import Drafter
from racer_local.ngram import NgramIndex, topk_rows
from racer_local.tree import DraftTree

GAP_EDGES = (1.0, 2.0, 4.0)  # logit-gap buckets: how sure the target was
ANCHOR_EDGES = (2, 4, 8)  # retrieval anchor-score buckets: about how long the match is


class CopyLogitTable:
    """next[token] -> the target's top-k after `token`, with each one's logit gap to the best."""

    def __init__(self, n_vocab: int, k: int) -> None:
        self.ids = np.full((n_vocab, k), -1, dtype=np.int32)
        self.gaps = np.zeros((n_vocab, k), dtype=np.float32)

    def update(self, tokens: Sequence[int], rows: np.ndarray) -> None:
        """Row i holds the target's logits after input tokens[i]; later rows win."""
        if not len(tokens):
            return
        ids = topk_rows(rows, self.ids.shape[1])
        top = np.take_along_axis(rows, ids, axis=1)
        # Gap of candidate j: top[0] - top[j]; for the best one, its margin over the second.
        gaps = top[:, :1] - top
        gaps[:, 0] = top[:, 0] - top[:, 1]
        tokens = np.asarray(tokens, dtype=np.int64)
        self.ids[tokens] = ids
        self.gaps[tokens] = gaps

    def candidates(self, token: int) -> list[tuple[int, tuple]]:
        """(child token, calibration key) pairs, best first; none if `token` was never seen."""
        ids = self.ids[token]
        if ids[0] < 0:
            return []
        gaps = np.searchsorted(GAP_EDGES, self.gaps[token]).tolist()
        return [(t, (min(j, 3), g)) for j, (t, g) in enumerate(zip(ids.tolist(), gaps))]


class Calibration:
    """Recent acceptance rate per candidate kind, started from a prior worth a few trials.

    A kind is (logit rank and gap or None, retrieval count bucket or None, depth bucket).
    Old outcomes fade (DECAY per trial of that kind): text moves between copying and free
    writing, and the drafts' reliability moves with it.
    """

    PRIOR_WEIGHT = 2.0
    DECAY = 0.97

    def __init__(self) -> None:
        self.counts: dict[tuple, list[float]] = {}

    @staticmethod
    def prior(key: tuple) -> float:
        logit, retrieved, _ = key
        p = 0.0
        if logit is not None:
            rank, gap = logit
            p = (0.35, 0.5, 0.65, 0.8)[gap] if rank == 0 else 0.12 / rank
        if retrieved is not None:
            anchor, best = retrieved
            q = (0.3, 0.45, 0.65, 0.8)[anchor] * (1.0 if best else 0.4)
            p = max(p, q) + (0.1 if logit is not None else 0)
        return min(p, 0.95)

    def p(self, key: tuple) -> float:
        got = self.counts.get(key)
        if got is None:
            return self.prior(key)
        return got[0] / got[1]

    def record(self, key: tuple, accepted: bool) -> None:
        got = self.counts.setdefault(key, [self.prior(key) * self.PRIOR_WEIGHT, self.PRIOR_WEIGHT])
        got[0] = got[0] * self.DECAY + accepted
        got[1] = got[1] * self.DECAY + 1


class Racer(Drafter):
    name = "racer"

    def __init__(
        self,
        cost: CostCurve,
        *,
        retrieval: bool = True,
        logits: bool = True,
        top_k: int = 8,
        window: int = 10,
        max_index_nodes: int = 100_000,
        prompt_rows: int = 1,
        max_nodes: int = 32,
        keep_state: bool = False,
    ) -> None:
        self.cost = cost
        self.use_retrieval, self.use_logits = retrieval, logits
        self.top_k, self.max_nodes = top_k, max_nodes
        self.prefill_rows = max(1, prompt_rows) if logits else 1
        self.index = NgramIndex(window=window, max_nodes=max_index_nodes)
        self.keep_state = keep_state
        self._seen: list[int] = []  # the context indexed so far: prompt and committed tokens
        self.table: CopyLogitTable | None = None
        self.calibration = Calibration()
        self._keys: dict[tuple[int, ...], tuple] = {}  # draft path -> its candidate kind
        self._overhead = 0.0  # seconds of drafting work per step (moving average)
        self._work = 0.0

    def begin(self, context: Sequence[int], rows: np.ndarray) -> None:
        """Index the context. A drafter kept across requests (a chat session) only indexes what
        follows the previous context; its table and calibration carry over in any case."""
        seen = self._seen
        if self.keep_state and seen and list(context[: len(seen)]) == seen:
            self.index.extend(context[len(seen) :])
        else:  # a first request, or a history that was edited or re-tokenized
            self.index.reset()
            self.index.extend(context)
        if self.table is None or not self.keep_state:
            self.table = CopyLogitTable(rows.shape[1], self.top_k)
            self.calibration = Calibration()
        self._seen = list(context)
        if self.use_logits:
            self.table.update(context[len(context) - len(rows) :], rows)

    def propose(self, root: int, budget: int) -> DraftTree:
        start = time.perf_counter()
        limit = min(budget, self.max_nodes) - 1
        retrieved = self._retrieved(root, limit)
        # Best-first by path probability: a child never beats its parent, so parents pop first.
        heap: list[tuple[float, int, tuple[int, ...], tuple]] = []
        chosen: list[tuple[tuple[int, ...], float]] = []
        path, p, token, tie = (), 1.0, root, 0
        while len(chosen) < limit:
            for child, key in self._children(path, token, retrieved):
                tie += 1
                heapq.heappush(heap, (-p * self.calibration.p(key), tie, (*path, child), key))
            if not heap:
                break
            neg_p, _, path, key = heapq.heappop(heap)
            p, token = -neg_p, path[-1]
            chosen.append((path, p))
            self._keys[path] = key
        size = self._best_size([q for _, q in chosen])
        self._work = time.perf_counter() - start
        return DraftTree.build(root, [path for path, _ in chosen[: size - 1]])

    def _retrieved(self, root: int, budget: int) -> dict[tuple[int, ...], dict[int, tuple]]:
        """prefix -> {next token: retrieval kind} from the n-gram index.

        A continuation's kind is (how strong its anchor is, is it its siblings' best). The
        anchor, its depth-1 ancestor, scores about the length of the matched context (each
        matched suffix adds its count); deeper scores shrink with the window, not with
        reliability, so they only rank siblings.
        """
        children: dict[tuple[int, ...], dict[int, tuple]] = {}
        if not self.use_retrieval or budget <= 0:
            return children
        nodes = self.index.retrieve_nodes(root, budget)
        best: dict[int, int] = {}
        for _, parent, score in nodes:
            best[parent] = max(best.get(parent, 0), score)
        paths: list[tuple[int, ...]] = []
        anchors: list[int] = []
        for token, parent, score in nodes:
            prefix = paths[parent] if parent >= 0 else ()
            anchor = anchors[parent] if parent >= 0 else int(np.searchsorted(ANCHOR_EDGES, score, "right"))
            paths.append((*prefix, token))
            anchors.append(anchor)
            children.setdefault(prefix, {})[token] = (anchor, score == best[parent])
        return children

    def _children(self, path, token, retrieved) -> list[tuple[int, tuple]]:
        kinds: dict[int, list] = {}
        if self.use_logits and self.table is not None:
            for child, key in self.table.candidates(token):
                kinds[child] = [key, None]
        for child, kind in retrieved.get(path, {}).items():
            kinds.setdefault(child, [None, None])[1] = kind
        depth = min(len(path) + 1, 3)
        return [(child, (lk, rk, depth)) for child, (lk, rk) in kinds.items()]

    def _best_size(self, probs: list[float]) -> int:
        """Tree size (root included) maximising expected committed tokens per second."""
        best, best_rate, expected = 1, 1.0 / (self.cost.time(1) + self._overhead), 1.0
        for n, p in enumerate(probs, start=2):
            expected += p
            rate = expected / (self.cost.time(n) + self._overhead)
            if rate > best_rate:
                best, best_rate = n, rate
        return best

    def observe(self, tree: DraftTree, rows: np.ndarray, path: Sequence[int]) -> None:
        start = time.perf_counter()
        on_path = set(path)
        for i in range(1, len(tree)):
            if tree.parents[i] in on_path:  # the walk reached this node's parent: it was tried
                key = self._keys.get(self._path_of(tree, i))
                if key is not None:
                    self.calibration.record(key, i in on_path)
        self._keys.clear()
        if self.use_logits:
            self.table.update(tree.tokens, rows)
        accepted = [tree.tokens[i] for i in path]
        self.index.extend(accepted)
        self._seen += accepted
        self._work += time.perf_counter() - start
        self._overhead = 0.9 * self._overhead + 0.1 * self._work

    @staticmethod
    def _path_of(tree: DraftTree, i: int) -> tuple[int, ...]:
        tokens = []
        while i > 0:
            tokens.append(tree.tokens[i])
            i = tree.parents[i]
        return tuple(reversed(tokens))
