"""The drafter interface: propose a tree below a known root, then learn what was verified."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from racer_local.tree import DraftTree


class Drafter:
    """Base class; the default drafts nothing (plain decoding through the same loop)."""

    name = "ar"
    prefill_rows = 1  # how many trailing prompt positions' logits begin() wants

    def begin(self, context: Sequence[int], rows: np.ndarray) -> None:
        """A generation starts: `context` is everything in the KV cache (the prompt), `rows`
        the logits of its last len(rows) positions. Called once per request."""

    def expect(self, tokens: Sequence[int]) -> None:
        """Text this request's output will likely repeat (OpenAI's predicted outputs: an edited
        file, say): a source of drafts, never of output. Called after begin(), on the requests
        that give one."""

    def propose(self, root: int, budget: int) -> DraftTree:
        """A tree of at most `budget` nodes whose root is `root` (the target's next token)."""
        return DraftTree.chain(root)

    def observe(self, tree: DraftTree, rows: np.ndarray, path: Sequence[int]) -> None:
        """After verification: `rows[i]` are the logits of tree node i, and the nodes in
        `path` (root first) are now committed context."""
