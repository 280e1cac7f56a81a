"""What drafts from the context could have been worth at best: the bench's bound for a text.

At every step of the target's own text (`ar`'s tokens), the longest draft that the copy
source (prompt lookup's match) or the n-gram index held there and the target would have
accepted; then the cheapest way through the text with drafts no longer than those, priced by the
cost curve. That is an oracle which knows which drafts pass, drawing on the same two sources
racer's trees do: a racer priced well below it leaves gains on the table (its estimates or its
search), and a target above it cannot be met by better trees, only by cheaper verification or by
other sources. The copy-logit table is left out, since its drafts depend on which rows the
verifications computed; a racer above the bound gained from it. Sampled, the oracle knows the
draws too, where a tree can only bet on the distribution, so the bound is further out of reach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from racer_local.drafters.history import History, looped
from racer_local.drafters.racer import RacerConfig
from racer_local.ngram import NgramIndex


def draftable(context: Sequence[int], tokens: Sequence[int], longest: int,
              config: RacerConfig | None = None) -> list[int]:
    """For each tokens[i] as a step's root (after context + tokens[:i]), how many of the tokens
    after it the copy source's run or a path of the n-gram index's tree matched, at most
    `longest`. Both sources as racer builds them (config's window and copy match)."""
    config = config or RacerConfig()
    history, index = History(), NgramIndex(window=config.window, max_nodes=config.max_index_nodes)
    history.extend(context)
    index.extend(context)
    lengths = []
    for i, root in enumerate(tokens):
        want = list(tokens[i + 1 : i + 1 + longest])
        _, run = history.copy(root, config.copy_match, len(want))
        run = looped(run, root, len(want))  # as racer's copy source: past the context's end, a loop
        best = _common(run, want)
        matched: list[int] = []  # per retrieved node: its depth if its path matches, else 0
        for token, parent, _ in index.retrieve_nodes(root, len(want)) if want else ():
            depth = 1 if parent < 0 else matched[parent] + 1 if matched[parent] else 0
            ok = 0 < depth <= len(want) and want[depth - 1] == token
            matched.append(depth if ok else 0)
        best = max([best, *matched])
        lengths.append(best)
        history.extend([root])
        index.extend([root])
    return lengths


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def cheapest(lengths: Sequence[int], relative: Callable[[int], float], sizes: Sequence[int]) -> float:
    """The least total t(N)/t(1) to produce the text: each step verifies its root and at most
    lengths[i] drafts, in a tree of one of `sizes`, and commits them all."""
    sizes = sorted({1, *sizes})  # the root alone always fits
    best = [0.0] * (len(lengths) + 1)
    for i in range(len(lengths) - 1, -1, -1):
        best[i] = min(relative(n) + best[i + n] for n in sizes
                      if n - 1 <= lengths[i] and i + n <= len(lengths))
    return best[0]
