"""The context as a growing token array, and prompt lookup's match in it: what followed the
most recent earlier occurrence of the context's longest matching suffix. Shared by `pld` (its
whole method) and RACER (its copy source)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class History:
    """The context as a growing token array, and prompt lookup's match in it."""

    def __init__(self) -> None:
        self.tokens = np.zeros(1024, dtype=np.int32)
        self.n = 0

    def extend(self, tokens: Sequence[int]) -> None:
        need = self.n + len(tokens)
        if need > len(self.tokens):
            self.tokens = np.resize(self.tokens, max(need, 2 * len(self.tokens)))
        self.tokens[self.n : need] = tokens
        self.n = need

    def copy(self, root: int, longest: int, limit: int, shortest: int = 2) -> tuple[int, list[int]]:
        """(match length, continuation): what followed the most recent earlier occurrence of the
        longest suffix of context + [root] (`shortest`..`longest` tokens) that occurred before."""
        hay, n = self.tokens, self.n
        if n < 2 or limit <= 0:
            return 0, []
        ends = np.flatnonzero(hay[: n - 1] == root)  # earlier roots that have a continuation
        if shortest >= 2:  # a match must take in the token before the root as well
            ends = ends[(ends >= 1) & (hay[ends - 1] == hay[n - 1])]
        if not len(ends):
            return 0, []
        # Every candidate's match extended backwards at once: a loop of numpy calls per token
        # cost 150 us on a 32-token match, this about 20.
        back = np.arange(1, min(longest, n))
        before = ends[:, None] - back
        same = (hay[np.maximum(before, 0)] == hay[n - back]) & (before >= 0)
        length = 1 + np.logical_and.accumulate(same, axis=1).sum(axis=1)
        best = int(length.max())
        if best < shortest:
            return 0, []
        at = int(ends[np.flatnonzero(length == best)[-1]])  # the most recent of the longest
        return best, hay[at + 1 : min(at + 1 + limit, n)].tolist()
