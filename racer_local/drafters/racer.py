"""RACER: one draft tree from retrieval (n-gram index), copy-logits (the model's own top-k) and
long copies (prompt lookup's matched occurrence), verified in one pass.

Every candidate child of a tree node comes from one or more sources:
- retrieval: continuations seen after the context's matched suffixes (ngram.NgramIndex);
- logits: `table[token]`, the target's top-k after the last place `token` was an input,
  refreshed from every verified node, rejected ones included;
- copy: the tokens that followed the most recent occurrence of the context's longest matching
  suffix, as far as the cost curve lets a chain pay, not as far as the index window reaches
  (names and numbers in translations, quotes in summaries, code edits); where that occurrence
  is so recent that the copy runs into the context's end, round again as a loop (history.looped:
  a list, a refrain, a small model repeating itself), judged apart; and, where a request
  predicts its output (OpenAI's `prediction`), what followed that tail in the prediction.
Each candidate gets a calibrated probability of being accepted given its parent was: the
acceptance rate observed so far for candidates of its kind (which sources proposed it, at
what rank and logit gap, how long the copied match is and how far into the copy it is),
starting from a weak prior. A best-first search then grows the tree by path probability,
and the tree size N is the one that maximises tokens per second, (expected tokens, 1 + sum of
the first N-1 path probabilities, less `risk` standard deviations of them) / cost(N), on the
cost curve (measured, then refined from the step times observed here): when drafts keep
failing it shrinks to the root alone, plain decoding. Calibrations are shared by the drafters
of one backend, method and mode (greedy or sampled), so a request starts from what earlier
ones observed.

Seeding the table from the prompt costs a full vocabulary projection per prompt position
(about 4 ms each for gemma-3-270m's 262k vocabulary on 2 CPU cores). Measured side by side on
Spec-Bench dev prompts, seeding from the last 16 positions cost 0.1 s of prefill and bought no
acceptance, so by default only the last position (which the prefill computes anyway) seeds
it; `prompt_rows` bounds the choice. Left out: the reference's fixed halving-breadth tree,
which the calibrated best-first search replaces.
"""

from __future__ import annotations

import copy
import heapq
import time
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from racer_local import topk
from racer_local.drafters.base import Drafter
from racer_local.drafters.history import History, Prediction, looped
from racer_local.ngram import NgramIndex
from racer_local.tree import DraftTree

GAP_EDGES = (1.0, 2.0, 4.0)  # logit-gap buckets: how sure the target was
ANCHOR_EDGES = (2, 4, 8)  # retrieval anchor-score buckets: about how long the match is
# copy: matched suffix length buckets (2, 3, 4-7, 8-15, 16-31, 32+ tokens). Longer matches are
# likelier copies: replaying the copy source over `ar`'s own text of the bench's 16 dev prompts,
# its first token was right 0.92 of the time after an 8-11 token match and 0.99 after 12 or more
# (gemma-3-270m), 0.81 after 8-15, 0.91 after 16-23 and 1.0 after 24+ (Qwen2.5-Coder-0.5B).
COPY_MATCH_EDGES = (3, 4, 8, 16, 32)
COPY_POS_EDGES = (2, 3, 5, 9, 17)  # copy: position in the copied run (1, 2, 3-4, 5-8, 9-16, 17+)
# The match bucket of a copy from the request's predicted output, whatever the match's length:
# the caller said the output would repeat it, so it is judged apart from the context's copies.
PREDICTED = len(COPY_MATCH_EDGES) + 1
# The match bucket of a context copy's tokens past the context's end (history.looped): a bet
# that the text goes round again, judged apart from copies of text that exists. Before loops a
# copy stopped at the context's end, so a model repeating a 12-token sentence got 12-token drafts.
# benchmarks/replay_drafts.py, priced: gemma-3-270m 3.46x -> 3.61x `ar` (dev prompts; qa 3.69x ->
# 4.23x, math 3.14x -> 3.59x) and 3.05x -> 3.06x (held-out); Qwen2.5-Coder-0.5B and SmolLM2-135M,
# whose replies rarely loop, unchanged (1.20x / 1.15x, 1.18x -> 1.19x).
LOOPED = PREDICTED + 1


@dataclass(frozen=True)
class RacerConfig:
    """RACER's settings; the sources can be switched off for ablations."""

    retrieval: bool = True
    logits: bool = True
    copy: bool = True
    top_k: int = 8  # copy-logit table width: the paper's k
    window: int = 10  # n-gram index window: the paper's
    max_index_nodes: int = 100_000  # index node cap: bounds memory in long sessions (measured here)
    prompt_rows: int = 1  # prompt positions seeding the table: see the module docstring
    max_nodes: int | None = None  # tree size cap; None: the cost curve's largest measured size
    copy_match: int = 32  # longest suffix the copy source matches: COPY_MATCH_EDGES' last edge
    # A tree must promise this much more than plain decoding: the estimates that only just pay
    # are the ones most likely overestimated (they were picked for being high). Measured on
    # Qwen2.5-Coder-0.5B, ar's text forced on both, the categories where racer lost to ar:
    # 1.00x `ar` with 1.05, 0.98x with 1.0 (within noise, but never the other way).
    pay_margin: float = 1.05
    # A tree is worth its expected tokens less `risk` standard deviations of them: a bet that pays
    # on average can still lose a short reply's whole gain, as the first copy of a 22-token
    # translation did (a 16-node tree at 0.62, nothing accepted: 0.87x `ar` priced), while a long
    # copy that is nearly sure keeps its size. benchmarks/replay_drafts.py, ar's text priced by
    # the curve, dev and held-out prompts: 0.35 moved Qwen2.5-Coder-0.5B from 1.18x to 1.20x and
    # 1.13x to 1.15x (translation 0.87x to 1.00x), gemma-3-270m from 3.48x to 3.46x and 3.06x to
    # 3.05x; 0.5 cost gemma 1.7%, 1.0 cost both.
    risk: float = 0.35


class CopyLogitTable:
    """next[token] -> the target's top-k after `token`, with each one's logit gap to the best."""

    READ_CAP = 4096  # tokens whose candidates are kept read: a long session's stay bounded
    TOUCHED_CAP = 65_536  # rows written that clear() resets one by one; past it, all of them

    def __init__(self, n_vocab: int, k: int) -> None:
        # Zeroed, so the pages are the kernel's until written (a full fill cost 10 ms a request
        # for a 262k vocabulary); ids are stored plus one, 0 meaning "never seen".
        self.ids = np.zeros((n_vocab, k), dtype=np.int32)
        self.gaps = np.zeros((n_vocab, k), dtype=np.float32)
        # token -> candidates(token), until its row changes: a search reads a token's
        # candidates at each node it pops, and the next step's search pops most of them again.
        self._read: dict[int, list[tuple[int, tuple]]] = {}
        self._touched: list[np.ndarray] | None = []  # rows written since clear(); None: too many
        self._n_touched = 0

    @classmethod
    def fresh(cls, n_vocab: int, k: int, owner: object) -> CopyLogitTable:
        """An empty table for `owner`, given back for reuse once `owner` is gone. A new table's
        pages are the kernel's until written, and each first write faults one in: on a fresh
        gemma-3-270m table an update cost 245 us against 6.5 us on a used one (8 random rows, mean
        of 300 here), and every request began a fresh one. A reused one is cleared row by row."""
        spare = _spare_tables.get((n_vocab, k))
        table = spare.pop() if spare else cls(n_vocab, k)
        table.clear()
        weakref.finalize(owner, _give_back, (n_vocab, k), table)
        return table

    def clear(self) -> None:
        """Forget every row: what a new table holds."""
        if self._touched is None:
            self.ids.fill(0)
        else:
            for rows in self._touched:
                self.ids[rows] = 0
        self._touched, self._n_touched = [], 0
        self._read.clear()

    def update(self, tokens: Sequence[int], rows) -> None:
        """Row i holds the target's logits (full or top-k) after input tokens[i]; later rows win."""
        if not len(tokens):
            return
        ids, top = topk.top(rows, self.ids.shape[1])
        # Gap of candidate j: top[0] - top[j]; for the best one, its margin over the second.
        gaps = top[:, :1] - top
        gaps[:, 0] = top[:, 0] - top[:, 1]
        for token in tokens:
            self._read.pop(token, None)
        tokens = np.asarray(tokens, dtype=np.int64)
        if self._touched is not None:
            self._n_touched += len(tokens)
            if self._n_touched > self.TOUCHED_CAP:
                self._touched = None
            else:
                self._touched.append(tokens)
        self.ids[tokens] = ids + 1
        self.gaps[tokens] = gaps

    def candidates(self, token: int) -> list[tuple[int, tuple]]:
        """(child token, calibration key) pairs, best first; none if `token` was never seen."""
        got = self._read.get(token)
        if got is None:
            ids = self.ids[token].tolist()
            gaps = self.gaps[token].tolist()  # bucketed in Python: numpy's call costs more for 8 values
            got = [] if ids[0] == 0 else [(t - 1, (min(j, 3), bisect_left(GAP_EDGES, g)))
                                          for j, (t, g) in enumerate(zip(ids, gaps))]
            if len(self._read) >= self.READ_CAP:
                self._read.clear()
            self._read[token] = got
        return got


_spare_tables: dict[tuple[int, int], list[CopyLogitTable]] = {}  # (n_vocab, k) -> tables to reuse
SPARE_TABLES = 2  # per shape: a bench's racer and an ablation, one after the other


def _give_back(shape: tuple[int, int], table: CopyLogitTable) -> None:
    spare = _spare_tables.setdefault(shape, [])
    if len(spare) < SPARE_TABLES:
        spare.append(table)


class Calibration:
    """Recent acceptance rate per candidate kind, shrunk towards the rate of its class.

    A kind is (logit rank and gap or None, retrieval anchor bucket and best flag or None, copy
    match and position buckets or None, depth bucket); its class is which sources proposed it
    and the depth. A kind never tried starts at its class's observed rate, shrunk towards
    `parent`'s estimate (or, at the root, a fixed prior), so a new kind on a new model is judged
    by what its relatives did there. A request's calibration has the shared one of its backend
    as parent: it starts from what earlier requests saw, and its own few trials soon outweigh
    them (a summary after translations: copies that were right 98% of the time there fail
    here, and trusting the shared rate alone cost ten oversized trees before it moved;
    measured on gemma-3-270m, summarization 0.74x `ar` with the shared rate alone).
    Old outcomes fade (DECAY per trial): text moves between copying and free writing, and
    the drafts' reliability moves with it. `log` (the root's) keeps, per kind, trials,
    predicted and accepted totals: the bench's calibration table.
    """

    # Both chosen, not tuned (never varied on the bench): two trials of evidence for the rate a
    # kind is shrunk towards, and a memory of about a paragraph of text per kind.
    WEIGHT = 2.0  # the rate a kind is shrunk towards counts as two trials
    DECAY = 0.97  # an outcome's weight halves after about 23 trials of its kind

    def __init__(self, parent: Calibration | None = None) -> None:
        self.parent = parent
        self.counts: dict[tuple, list[float]] = {}  # kind -> [accepted, trials], decayed
        self.classes: dict[tuple, list[float]] = {}  # class -> [accepted, trials], decayed
        self.log: dict[tuple, list[float]] = {}

    @staticmethod
    def prior(key: tuple) -> float:
        """A guess before any trial of the class: below what greedy decoding on gemma-3-270m
        showed in the bench's calibration table here, as a wrongly trusted draft costs a tree."""
        logit, retrieved, copied, _ = key
        p = 0.0
        if logit is not None:
            rank, gap = logit
            p = (0.2, 0.3, 0.45, 0.6)[gap] if rank == 0 else 0.06 / rank
        for q in (_retrieval_prior(retrieved), _copy_prior(copied)):
            if q is not None:
                p = max(p, q) + (0.05 if p else 0)
        return min(p, 0.95)

    @staticmethod
    def _class(key: tuple) -> tuple:
        return (key[0] is None, key[1] is None, key[2] is None, key[3])

    def p(self, key: tuple) -> float:
        """The kind's own trials shrunk towards its parent's rate for it; a kind with no trials
        here yet gets the parent's rate shrunk towards its class's trials here instead.

        Never both: the class's counts hold the kind's own trials, so shrinking a tried kind
        towards its class counted each trial twice, and one accepted copy raised its kind from
        0.63 to 0.86 (Qwen2.5-Coder-0.5B, a 24-token answer after summaries; the next tree on
        it failed). Priced by the cost curve on `ar`'s text of the 16 dev prompts: 1.13x `ar`
        against 1.08x with both (Qwen2.5-Coder-0.5B), 2.33x against 2.28x (gemma-3-270m).
        """
        base = self.parent.p(key) if self.parent else self.prior(key)
        got = self.counts.get(key)
        if got is None:
            got = self.classes.get(self._class(key))
            if got is None:
                return base
        return (got[0] + self.WEIGHT * base) / (got[1] + self.WEIGHT)

    def record(self, key: tuple, accepted: bool, predicted: float | None = None) -> None:
        """One trial of `key`; `predicted` is the chance the search gave it (by default, this p):
        beside likelier siblings that is less than its kind's rate, and the bench's calibration
        table compares what the trees were built on."""
        predicted = self.p(key) if predicted is None else predicted
        if self.parent:
            self.parent.record(key, accepted, predicted)
        else:
            seen = self.log.setdefault(key, [0, 0.0, 0])
            seen[0] += 1
            seen[1] += predicted
            seen[2] += accepted
        for table, k in ((self.counts, key), (self.classes, self._class(key))):
            got = table.setdefault(k, [0.0, 0.0])
            got[0] = got[0] * self.DECAY + accepted
            got[1] = got[1] * self.DECAY + 1


def _retrieval_prior(kind) -> float | None:
    if kind is None:
        return None
    anchor, best = kind
    return (0.2, 0.3, 0.45, 0.6)[anchor] * (1.0 if best else 0.4)


def _copy_prior(kind) -> float | None:
    if kind is None:
        return None
    match, pos = kind
    return min(0.9, (0.35, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.6)[match] + 0.04 * pos)


def source_of(key: tuple) -> str:
    """A kind's sources, e.g. "logits+copy": the rows of the bench's calibration table."""
    names = [name for name, part in zip(("logits", "retrieval", "copy"), key[:3]) if part is not None]
    return "+".join(names)


def calibration_table(calibration: Calibration) -> list[dict]:
    """Predicted vs observed acceptance per source and depth, over every trial logged."""
    rows: dict[tuple[str, int], list[float]] = {}
    for key, (n, predicted, accepted) in calibration.log.items():
        row = rows.setdefault((source_of(key), key[3]), [0, 0.0, 0])
        row[0] += n
        row[1] += predicted
        row[2] += accepted
    return [{"source": src, "depth": depth if depth < 3 else "3+", "trials": n,
             "predicted": predicted / n, "observed": accepted / n}
            for (src, depth), (n, predicted, accepted) in sorted(rows.items())]


# Calibrations by (backend, method, greedy): a new drafter starts where the last one left off.
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_calibration(backend, method: str, greedy: bool) -> Calibration:
    by_mode = _shared.setdefault(backend, {})
    return by_mode.setdefault((method, greedy), Calibration())


def saved_calibrations(backend) -> Callable[[], None]:
    """A function that puts the backend's shared calibrations back to what they are now (their
    logs keep every trial): a benchmark's repeats of one prompt then all start from what the
    earlier prompts taught, never from the prompt itself."""
    by_mode = _shared.setdefault(backend, {})
    saved = {mode: copy.deepcopy((c.counts, c.classes)) for mode, c in by_mode.items()}

    def restore() -> None:
        for mode, c in by_mode.items():
            c.counts, c.classes = copy.deepcopy(saved.get(mode, ({}, {})))

    return restore


class Racer(Drafter):
    name = "racer"
    STALE = 8  # nodes searched past twice the best size found: enough for a chain to pay off
    HINDSIGHT = 4  # candidates a step left out that are scored later against the committed text

    def __init__(self, cost, config: RacerConfig = RacerConfig(), *, keep_state: bool = False,
                 calibration: Calibration | None = None, n_vocab: int | None = None) -> None:
        """`cost`: a costmodel curve (time(n); observe(n, s) if it learns online). `n_vocab`
        sizes the copy-logit table (default: the width of the first full rows it sees)."""
        self.cost, self.config, self.n_vocab = cost, config, n_vocab
        self.max_nodes = config.max_nodes or max(getattr(cost, "sizes", (32,)))
        self.sizes = frozenset(getattr(cost, "sizes", ()))  # the sizes a tree may have (measured)
        self.prefill_rows = max(1, config.prompt_rows) if config.logits else 1
        self.index = NgramIndex(window=config.window, max_nodes=config.max_index_nodes)
        self.keep_state = keep_state
        self.history = History()  # the context indexed so far: prompt and committed tokens
        self.expected: Prediction | None = None  # this request's predicted output, if it gave one
        self.table: CopyLogitTable | None = None
        self.shared = calibration or Calibration()  # the backend's, across requests
        self.calibration = Calibration(parent=self.shared)  # this request's (a session's, if kept)
        self._keys: dict[tuple[int, ...], tuple[tuple, float]] = {}  # draft path -> (kind, chance)
        self._overhead = 0.0  # seconds of drafting per step (moving average)
        self._work = 0.0
        self._proposed_at = 0.0  # when the last tree left propose(): its verification starts
        # Candidates left out, scored later: (root position, path, (kind, chance)).
        self._pending: list[tuple[int, tuple[int, ...], tuple[tuple, float]]] = []

    def begin(self, context: Sequence[int], rows: np.ndarray) -> None:
        """Index the context. A drafter kept across requests (a chat session) only indexes what
        follows the previous context; its table and calibration carry over in any case."""
        n = self.history.n
        if self.keep_state and 0 < n <= len(context) and np.array_equal(context[:n], self.history.tokens[:n]):
            new = context[n:]
        else:  # a first request, or a history that was edited or re-tokenized
            self.index.reset()
            self.history = History()
            self._pending = []
            new = context
        if not self.keep_state:
            self.calibration = Calibration(parent=self.shared)
        self.expected = None
        self.index.extend(new)
        self.history.extend(new)
        if self.config.logits:
            if self.table is None or not self.keep_state:
                self.table = CopyLogitTable.fresh(self.n_vocab or rows.shape[1], self.config.top_k, self)
            self.table.update(context[len(context) - len(rows) :], rows)

    def expect(self, tokens: Sequence[int]) -> None:
        self.expected = Prediction(self.history, tokens) if len(tokens) else None

    def propose(self, root: int, budget: int) -> DraftTree:
        start = time.perf_counter()
        if hasattr(self.cost, "at"):  # priced at this context: see costmodel.CONTEXTS
            self.cost.at(self.history.n)
        limit = min(budget, self.max_nodes) - 1
        sources = self._sourced(root, limit)
        # Best-first by path probability: a child never beats its parent, so parents pop first,
        # and the first n nodes popped are the best n-node tree. Its size is the n with the best
        # expected tokens per second; the search stops once that has not improved for a while
        # (STALE), since later nodes are no likelier, or as soon as no bigger tree could beat
        # it even if every node still to come were as likely as the last (that changes no tree:
        # it only spares the search, most often when nothing pays and the root goes alone).
        heap: list[tuple[float, int, tuple[int, ...], tuple, float]] = []
        chosen: list[tuple[int, ...]] = []
        path, p, token, tie = (), 1.0, root, 0
        rates: dict[tuple, float] = {}  # kind -> calibrated rate: fixed until observe()
        # The sizes a tree may take (costmodel.SIZES: only measured ones) and their prices here.
        costs = {n: self.cost.time(n) + self._overhead for n in sorted(self.sizes or range(2, limit + 2))
                 if 1 < n <= limit + 1}
        size, best_rate, expected = 1, self.config.pay_margin / (self.cost.time(1) + self._overhead), 1.0
        var, risk = 0.0, self.config.risk
        while len(chosen) < limit and len(chosen) + 1 < 2 * size + self.STALE:
            for child, key, chance in self._chances(self._children(path, token, sources), rates):
                tie += 1
                heapq.heappush(heap, (-p * chance, tie, (*path, child), key, chance))
            if not heap:
                break
            neg_p, _, path, key, chance = heapq.heappop(heap)
            p, token = -neg_p, path[-1]
            chosen.append(path)
            self._keys[path] = key, chance
            # The accepted count's variance: a node is accepted with all its ancestors (len(path)
            # - 1 of them drafted) and never with a node of another branch.
            var += p * (1 - p) + 2 * p * (len(path) - expected)
            expected += p
            n = len(chosen) + 1
            worth = expected - risk * max(var, 0.0) ** 0.5
            if n in costs and worth / costs[n] > best_rate:
                size, best_rate = n, worth / costs[n]
            hindsight_ready = len(chosen) >= size - 1 + self.HINDSIGHT  # the left-out ones to score
            if hindsight_ready and not self._may_grow(expected, n, p, best_rate, costs):
                break
        # The best candidates left out are scored once the text they guessed is committed, so a
        # kind that is never drafted (its estimate too low to pay) still gets its estimate
        # corrected: without this, a low prior would stop a good source for good.
        at = self.history.n
        self._pending += [(at, q, self._keys[q]) for q in chosen[size - 1 : size - 1 + self.HINDSIGHT]]
        self._proposed_at = time.perf_counter()
        self._work = self._proposed_at - start  # drafting: the per-step cost besides cost(N)
        return DraftTree.build(root, chosen[: size - 1])

    @staticmethod
    def _may_grow(expected: float, n: int, p: float, best_rate: float, costs) -> bool:
        """Whether some measured size above n could beat best_rate if every node still to come
        were as likely as the last one popped (`p`, which bounds them all)."""
        return any(expected + (m - n) * p > best_rate * cost for m, cost in costs.items() if m > n)

    def _sourced(self, root: int, budget: int) -> dict[tuple[int, ...], dict[int, list]]:
        """prefix -> {next token: [retrieval kind, copy kind]} from the index and the history."""
        children: dict[tuple[int, ...], dict[int, list]] = {}
        if budget <= 0:
            return children
        if self.config.retrieval:
            for prefix, token, kind in self._retrieved(root, budget):
                children.setdefault(prefix, {}).setdefault(token, [None, None])[0] = kind
        if self.config.copy:
            match, run = self.history.copy(root, self.config.copy_match, budget)
            copied, run = len(run), looped(run, root, budget)  # past the context's end: a loop
            buckets = [bisect_right(COPY_MATCH_EDGES, match)] * copied + [LOOPED] * (len(run) - copied)
            copies = [(buckets, run)]
            if self.expected is not None:  # where both hold a token, the prediction's kind
                _, run = self.expected.copy(self.history, root, self.config.copy_match, budget)
                copies.append(([PREDICTED] * len(run), run))
            for buckets, run in copies:
                for i, (m, token) in enumerate(zip(buckets, run)):
                    kind = (m, bisect_right(COPY_POS_EDGES, i + 1))
                    children.setdefault(tuple(run[:i]), {}).setdefault(token, [None, None])[1] = kind
        return children

    def _retrieved(self, root: int, budget: int):
        """(prefix, next token, retrieval kind) from the n-gram index.

        A continuation's kind is (how strong its anchor is, is it its siblings' best). The
        anchor, its depth-1 ancestor, scores about the length of the matched context (each
        matched suffix adds its count); deeper scores shrink with the window, not with
        reliability, so they only rank siblings.
        """
        nodes = self.index.retrieve_nodes(root, budget)
        best: dict[int, int] = {}
        for _, parent, score in nodes:
            best[parent] = max(best.get(parent, 0), score)
        paths: list[tuple[int, ...]] = []
        anchors: list[int] = []
        for token, parent, score in nodes:
            prefix = paths[parent] if parent >= 0 else ()
            anchor = anchors[parent] if parent >= 0 else bisect_right(ANCHOR_EDGES, score)
            paths.append((*prefix, token))
            anchors.append(anchor)
            yield prefix, token, (anchor, score == best[parent])

    def _children(self, path, token, sources) -> list[tuple[int, tuple]]:
        kinds: dict[int, list] = {}
        if self.config.logits and self.table is not None:
            for child, key in self.table.candidates(token):
                kinds[child] = [key, None, None]
        for child, (rk, ck) in sources.get(path, {}).items():
            kinds.setdefault(child, [None, None, None])[1:] = (rk, ck)
        depth = min(len(path) + 1, 3)
        # A copied candidate is judged by the copy's record alone: split further by which other
        # sources agreed, each kind saw too few trials to learn from (measured on gemma-3-270m,
        # same text for every method: the union at 1.61x `ar` with the split, 1.69x without,
        # racer-copy 1.78x).
        return [(child, (None, None, ck, depth) if ck is not None else (lk, rk, None, depth))
                for child, (lk, rk, ck) in kinds.items()]

    def _chances(self, children: list[tuple[int, tuple]], rates: dict) -> list[tuple[int, tuple, float]]:
        """(child, kind, chance of acceptance given its parent's), best first.

        A node has one next token, so its children's chances cannot add up to more than one:
        each child gets at most what its likelier siblings leave. Each kind's rate is right on
        average, not beside a likelier sibling: five retrieved siblings tied for best were each
        rated 0.7 on Qwen2.5-Coder-0.5B, and the table's eight candidates kept their rates beside
        a copy right 98% of the time. The best child keeps its own (scaling every child down
        instead cut gemma-3-270m's tokens per step from 6.0 to 2.6). `rates` keeps each kind's
        rate for one search: a kind recurs at every node, and rates change only in observe().
        """
        for _, key in children:
            if key not in rates:
                rates[key] = self.calibration.p(key)
        rated = sorted((-rates[key], i) for i, (_, key) in enumerate(children))
        out, left = [], 1.0
        for neg, i in rated:
            chance = min(-neg, left)
            if chance <= 0:
                break
            left -= chance
            out.append((*children[i], chance))
        return out

    def observe(self, tree: DraftTree, rows: np.ndarray, path: Sequence[int]) -> None:
        on_path = set(path)
        for i in range(1, len(tree)):
            if tree.parents[i] in on_path:  # the walk reached this node's parent: it was tried
                got = self._keys.get(self._path_of(tree, i))
                if got is not None:
                    self.calibration.record(got[0], i in on_path, got[1])
        self._keys.clear()
        if self.config.logits:
            self.table.update(tree.tokens, rows)
        accepted = [tree.tokens[i] for i in path]
        self.index.extend(accepted)
        self.history.extend(accepted)
        self._score_pending()
        # From the tree's hand-over to here (verification, walk, commit and this bookkeeping,
        # which grows with the tree's rows) is what cost(N) predicts; drafting is the rest.
        if hasattr(self.cost, "observe"):
            self.cost.observe(len(tree), time.perf_counter() - self._proposed_at)
        self._overhead = 0.9 * self._overhead + 0.1 * self._work

    def _score_pending(self) -> None:
        """Record the left-out candidates whose guessed span is now committed text, as tried
        (and accepted or not) where their parent would have been accepted."""
        text, n, still = self.history.tokens, self.history.n, []
        for at, path, (key, chance) in self._pending:
            if at + len(path) >= n:
                still.append((at, path, (key, chance)))
                continue
            actual = text[at + 1 : at + 1 + len(path)].tolist()
            if actual[:-1] == list(path[:-1]):
                self.calibration.record(key, actual[-1] == path[-1], chance)
        self._pending = still[-4 * self.HINDSIGHT :]

    @staticmethod
    def _path_of(tree: DraftTree, i: int) -> tuple[int, ...]:
        tokens = []
        while i > 0:
            tokens.append(tree.tokens[i])
            i = tree.parents[i]
        return tuple(reversed(tokens))
