"""Prompt lookup decoding: copy what followed the most recent earlier match of the context's tail.

A linear draft (one chain), the classic retrieval baseline. Leaves out trees and frequencies:
that is RACER's retrieval side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from racer_local.drafters.base import Drafter
from racer_local.drafters.history import History, Prediction
from racer_local.tree import DraftTree


class PromptLookup(Drafter):
    name = "pld"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, max_draft: int = 8) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self.history = History()
        self.expected: Prediction | None = None

    def begin(self, context: Sequence[int], rows: np.ndarray) -> None:
        self.history = History()
        self.history.extend(context)
        self.expected = None

    def expect(self, tokens: Sequence[int]) -> None:
        self.expected = Prediction(self.history, tokens) if len(tokens) else None

    def propose(self, root: int, budget: int) -> DraftTree:
        limit = min(self.max_draft, budget - 1)
        found = [self.history.copy(root, self.max_ngram, limit, shortest=self.min_ngram)]
        if self.expected is not None:  # the longer match of the context's and the prediction's
            found.append(self.expected.copy(self.history, root, self.max_ngram, limit, self.min_ngram))
        return DraftTree.chain(root, max(found, key=lambda f: f[0])[1])

    def observe(self, tree: DraftTree, rows: np.ndarray, path: Sequence[int]) -> None:
        self.history.extend([tree.tokens[i] for i in path])
