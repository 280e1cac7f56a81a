"""Prompt lookup decoding: copy what followed the most recent earlier match of the context's tail.

A linear draft (one chain), the classic retrieval baseline. Leaves out trees and frequencies:
that is RACER's retrieval side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from racer_local.drafters.base import Drafter
from racer_local.tree import DraftTree


class PromptLookup(Drafter):
    name = "pld"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, max_draft: int = 8) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self._tokens = np.zeros(1024, dtype=np.int32)
        self._n = 0

    def _append(self, tokens: Sequence[int]) -> None:
        need = self._n + len(tokens)
        if need > len(self._tokens):
            self._tokens = np.resize(self._tokens, max(need, 2 * len(self._tokens)))
        self._tokens[self._n : need] = tokens
        self._n = need

    def begin(self, context: Sequence[int], rows: np.ndarray) -> None:
        self._n = 0
        self._append(context)

    def propose(self, root: int, budget: int) -> DraftTree:
        hay, size = self._tokens, self._n
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            starts = size - n  # an earlier match must leave at least one token to copy
            if starts <= 0:
                continue
            tail = np.append(hay[size - n + 1 : size], root)  # the last n tokens, root included
            match = hay[:starts] == tail[0]
            for j in range(1, n):
                match &= hay[j : j + starts] == tail[j]
            hits = np.flatnonzero(match)
            if len(hits):
                s = hits[-1] + n  # the most recent match
                return DraftTree.chain(root, hay[s : s + min(self.max_draft, budget - 1)].tolist())
        return DraftTree.chain(root)

    def observe(self, tree: DraftTree, rows: np.ndarray, path: Sequence[int]) -> None:
        self._append([tree.tokens[i] for i in path])
