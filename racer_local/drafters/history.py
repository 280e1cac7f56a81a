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

    def copy(self, root: int, longest: int, limit: int, shortest: int = 2,
             within: History | None = None, near: int | None = None) -> tuple[int, list[int]]:
        """(match length, continuation): what followed the most recent earlier occurrence of the
        longest suffix of context + [root] (`shortest`..`longest` tokens) that occurred before,
        or its occurrence `within` another text (a predicted output) nearest to the place `near`
        (the latest if None)."""
        hay, n = self.tokens, self.n
        ref, m = (hay, n) if within is None else (within.tokens, within.n)
        if m < 2 or limit <= 0 or (n < 1 and shortest >= 2):
            return 0, []
        ends = np.flatnonzero(ref[: m - 1] == root)  # places of the root that have a continuation
        if shortest >= 2:  # a match must take in the token before the root as well
            ends = ends[(ends >= 1) & (ref[ends - 1] == hay[n - 1])]
        if not len(ends):
            return 0, []
        # Every candidate's match extended backwards at once: a loop of numpy calls per token
        # cost 150 us on a 32-token match, this about 20.
        back = np.arange(1, min(longest, n + 1))
        before = ends[:, None] - back
        same = (ref[np.maximum(before, 0)] == hay[n - back]) & (before >= 0)
        length = 1 + np.logical_and.accumulate(same, axis=1).sum(axis=1)
        best = int(length.max())
        if best < shortest:
            return 0, []
        longest_ends = ends[length == best]
        if near is None:
            at = int(longest_ends[-1])  # the most recent of the longest
        else:  # the nearest; of two as near, the later
            later_first = longest_ends[::-1]
            at = int(later_first[np.argmin(np.abs(later_first - near))])
        return best, ref[at + 1 : min(at + 1 + limit, m)].tolist()


def looped(run: list[int], root: int, limit: int) -> list[int]:
    """A context copy (History.copy's run for `limit` tokens) that ran into the context's end,
    continued as if the text were a loop: what it copied, then the root, again and again, up to
    `limit`; any other run as it is. When the latest earlier occurrence is that close, the text
    has just repeated itself (a list, a refrain, a small model going round), and the copy's own
    next tokens are the ones it has just drafted."""
    if not 0 < len(run) < limit:  # no match, or a run that stopped at `limit`, not at the end
        return run
    period = [*run, root]
    return [period[i % len(period)] for i in range(limit)]


class Prediction:
    """A request's predicted output (OpenAI's `prediction`) to copy drafts from. It is stored
    behind the context's last token, so the output's first token matches as a continuation of
    the context; of equally long matches the one nearest the output's own position wins, since
    an output that follows its prediction is at the same place in both."""

    def __init__(self, context: History, tokens: Sequence[int]) -> None:
        self.text = History()
        self.text.extend([int(context.tokens[context.n - 1]) if context.n else -1, *tokens])
        self.start = context.n  # the context's length when the output began

    def copy(self, context: History, root: int, longest: int, limit: int,
             shortest: int = 2) -> tuple[int, list[int]]:
        """As context.copy, within the prediction; the root is output token context.n - start."""
        return context.copy(root, longest, limit, shortest, within=self.text, near=context.n - self.start + 1)
