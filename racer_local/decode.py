"""The speculative decode loop: draft -> verify in one llama_decode -> accept -> commit -> observe.

Every method runs through this one loop (`ar` is a drafter that drafts nothing). It also
owns the KV cache bookkeeping for trees: before a verification the committed prefix
(sequence 0) is shared with every path id; after it, the accepted cells join sequence 0 and
the path ids are dropped. Rollback runs in `finally`, so a cancelled or failed step never
leaves draft cells behind. Prompt handling, stop strings and text live in engine.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from racer_local.backend import Backend
from racer_local.drafters.base import Drafter
from racer_local.tree import DraftTree
from racer_local.verify import walk


@dataclass(frozen=True)
class Step:
    """What one forward pass committed."""

    tokens: list[int]  # committed tokens, in order (the root first)
    drafted: int  # draft nodes verified besides the root
    eog: bool  # the last token ends the generation
    # Where the step's time went; the rest is the KV commit and the loop itself.
    draft_s: float = 0.0  # the drafter proposing and observing (the copy-logit table's top-k too)
    build_s: float = 0.0  # sharing the prefix with the path ids and filling the batch
    verify_s: float = 0.0  # the forward pass: llama_decode, and racer-local's output layer if it ran
    read_s: float = 0.0  # fetching the rows: each node's top-k from the backend, or a view
    walk_s: float = 0.0  # choosing tokens along the tree (the argmax of full rows included)


def start(drafter: Drafter, choose: Callable[[np.ndarray], int], context, rows: np.ndarray) -> int:
    """A generation begins: the drafter sees the prompt (`context`, all of it in the KV cache)
    and the logits of its last positions (`rows`; it gets the last drafter.prefill_rows); the
    target chooses the first token from the last row. Returns that token: speculate's root."""
    drafter.begin(context, rows[-drafter.prefill_rows :])
    return choose(rows[-1])


def speculate(
    backend: Backend,
    drafter: Drafter,
    choose: Callable[[np.ndarray], int],
    root: int,
    n_past: int,
    max_tokens: int,
) -> Iterator[Step]:
    """Yield a Step per forward pass until max_tokens, end of generation or a full context.

    `root` is the token chosen from the prompt's last logits and `n_past` the number of
    committed cells; the caller has called start() (or drafter.begin()) first.
    """
    produced, clock = 0, time.perf_counter
    try:
        while produced < max_tokens:
            room = min(backend.n_ctx - n_past, backend.n_seq_max - 1)  # KV cells, path ids
            if room <= 0:
                return
            t0 = clock()
            tree = drafter.propose(root, room).limit(room, max_tokens - produced - 1)
            t1 = clock()
            if tree.tokens[0] != root:
                raise ValueError(f"drafter {drafter.name!r} proposed a root that is not the target's token")
            rows = _verify(backend, tree, n_past)
            t2 = clock()
            path, root = walk(tree, rows, choose)
            t3 = clock()
            tokens = [tree.tokens[i] for i in path]
            eog = next((i for i, t in enumerate(tokens) if backend.is_eog(t)), None)
            if eog is not None:
                path, tokens = path[: eog + 1], tokens[: eog + 1]
            _commit(backend, tree, path, n_past)
            t4 = clock()
            drafter.observe(tree, rows, path)
            n_past += len(path)
            produced += len(path)
            call, read = backend.call_s, backend.read_s
            yield Step(tokens, len(tree) - 1, eog is not None, draft_s=t1 - t0 + clock() - t4,
                       build_s=t2 - t1 - call - read, verify_s=call, read_s=read, walk_s=t3 - t2)
            if eog is not None:
                return
    finally:
        _rollback(backend, n_past)


def _verify(backend: Backend, tree: DraftTree, n_past: int) -> np.ndarray:
    for seq in range(1, tree.n_leaves + 1 if tree.n_leaves > 1 else 1):
        backend.seq_cp(0, seq)
    positions = [n_past + d for d in tree.depths]
    return backend.decode(tree.tokens, positions, tree.seq_ids)


def _commit(backend: Backend, tree: DraftTree, path: list[int], n_past: int) -> None:
    """Make the accepted cells part of sequence 0 and free every other draft cell."""
    end = n_past + len(path)
    if tree.n_leaves == 1:  # a chain lives in sequence 0 already
        backend.seq_rm(0, end, -1)
        return
    backend.seq_cp(tree.seq_ids[path[-1]][0], 0, n_past, end)
    for seq in range(1, tree.n_leaves + 1):
        backend.seq_rm(seq)


def _rollback(backend: Backend, n_past: int) -> None:
    """Leave exactly the committed prefix: no path ids, nothing past n_past in sequence 0."""
    for seq in range(1, backend.n_seq_max):
        backend.seq_rm(seq)
    backend.seq_rm(0, n_past, -1)
