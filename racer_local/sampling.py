"""Choosing the target's token from a logits row: argmax when greedy, a seeded draw otherwise.

One Sampler serves one generation and is shared by every method (`ar` included): it picks the
first token after the prompt, the token at every node the verification walk visits, and the
bonus token. Each pick costs exactly one uniform draw, so the i-th generated token always
comes from the i-th draw. Like llama.cpp's sampler chain, choosing a token also accepts it:
the walk only asks at nodes it commits, so the sampler's repeat-penalty window is the
context as it stands at that node, the tree path included.

The transforms follow llama.cpp's order and rules: the logit bias, the penalties over the last
`repeat_last_n` tokens (repeat, then frequency and presence, as llama-server applies the OpenAI
API's two: over that window, where OpenAI counts the whole text), then top-k, top-p, min-p,
then temperature. Left out: DRY, typical-p, XTC, mirostat and grammars.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from racer_local.topk import TopK, best

# Top-p looks for its cut among the logits within a gap of the best first (a comparison over the
# row, where a partition costs milliseconds on a 262k vocabulary: median 3 tokens within 4 on
# gemma-3-270m's sampled rows, 35 within 8), then among the best _HEAD, then the whole row.
# Flat rows hold thousands within 8 and their nucleus often reaches past 8: finer gaps and a
# longer head keep them off the partition and the whole-row sort (328 rows of gemma-3-270m at
# temperature 0.8, top-p 0.95, same draws: mean 1.24 -> 0.57 ms a token, 90th percentile
# 4.02 -> 0.86, worst 39.9 -> 1.7; the gaps 4, 8, 16 and a 4,096 head before).
_GAPS = (4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
_HEAD = 16384
_BLOCK = 1024  # _draw sums the row in blocks this long before it looks inside one


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy: the argmax after the repeat penalty
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the fewest most likely tokens whose mass reaches p; 1 = off
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the best; 0 = off
    repeat_penalty: float = 1.0  # llama.cpp's rule (divide positive logits, multiply negative); 1 = off
    frequency_penalty: float = 0.0  # minus this per occurrence in the window (llama.cpp's rule); 0 = off
    presence_penalty: float = 0.0  # minus this once for a token in the window; 0 = off
    repeat_last_n: int = 64  # the penalties' window in tokens (llama.cpp's default)
    # Added to a token's logit before anything else, as llama.cpp's logit_bias (-inf bans it):
    # {token id: bias} or (token id, bias) pairs, a later pair winning.
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = ()
    seed: int | None = None  # None: a fresh random seed
    context: Sequence[int] = ()  # the tokens before the first choice (the prompt)
    _rng: np.random.Generator = field(init=False, repr=False)
    _recent: deque = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            raise ValueError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        try:
            bias = dict(self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias)
            self._bias_ids = np.array([int(t) for t in bias], dtype=np.int64)
            self._bias = np.array([float(b) for b in bias.values()], dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must be {{token id: bias}} or (token id, bias) pairs, got "
                             f"{self.logit_bias!r}") from None
        if (self._bias_ids < 0).any() or np.isnan(self._bias).any():
            raise ValueError(f"logit_bias takes token ids >= 0 and biases that are numbers, got {bias}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        self._rng = np.random.default_rng(self.seed)
        self._recent = deque(self.context, maxlen=self.repeat_last_n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_full_rows(self) -> bool:
        """A draw needs the whole distribution and a penalty can move the argmax; plain greedy
        needs only the best token (a TopK row will do)."""
        return not self.greedy or self._adjusts

    @property
    def biased(self) -> list[int]:
        """The token ids logit_bias moves."""
        return self._bias_ids.tolist()

    @property
    def _penalizes(self) -> bool:
        return self.repeat_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def _adjusts(self) -> bool:
        return self._penalizes or len(self._bias_ids) > 0

    def __call__(self, row: np.ndarray | TopK) -> int:
        """Choose the next token from `row` and take it as committed."""
        if isinstance(row, TopK):
            if self.needs_full_rows:
                raise ValueError("sampling and the penalties need full logits rows, not top-k rows")
            token = best(row)
        elif self.greedy:
            token = int(self._adjusted(row).argmax())
        else:
            ids, weights = self._weights(row)
            i = _draw(weights, self._rng.random())
            token = i if ids is None else int(ids[i])
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Record a token as committed without choosing it (it joins the penalty window)."""
        self._recent.append(token)

    def distribution(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that the next non-greedy choice draws from.

        Ids are in draw order: by id when nothing is truncated, else most likely first.
        """
        ids, weights = self._weights(row)
        return (np.arange(len(row)) if ids is None else ids), weights / weights.sum()

    def _weights(self, row: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Unnormalised float64 probabilities, and their ids (None: the whole row, by id)."""
        logits = self._adjusted(row)
        ids = None
        if self.top_k or self.top_p < 1 or self.min_p > 0:
            ids, logits = self._truncated(logits)
        z = logits.astype(np.float64)
        z -= z.max()
        z /= self.temperature
        return ids, np.exp(z, out=z)

    def _adjusted(self, row: np.ndarray) -> np.ndarray:
        """The row after the logit bias and the penalties."""
        if not self._adjusts:
            return row
        out = row.copy()  # never write into the caller's row: it may be llama.cpp's buffer
        if len(self._bias_ids):
            if self._bias_ids.max() >= len(row):
                raise ValueError(f"logit_bias names token {self._bias_ids.max()}, but the vocabulary has "
                                 f"{len(row)} tokens")
            out[self._bias_ids] += self._bias
        if not self._recent or not self._penalizes:  # a bias alone: no window to count
            return out
        ids, counts = np.unique(np.fromiter(self._recent, dtype=np.int64), return_counts=True)
        vals = out[ids]
        if self.repeat_penalty != 1:
            vals = np.where(vals <= 0, vals * self.repeat_penalty, vals / self.repeat_penalty)
        out[ids] = vals - (counts * self.frequency_penalty + self.presence_penalty)
        return out

    def _truncated(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The survivors of top-k, top-p and min-p, most likely first (ties by id).

        Each filter keeps a prefix of the sorted row, so only the shortest prefix matters;
        top-p measures mass within the top-k survivors, as llama.cpp does.
        """
        n, best = len(logits), float(logits.max())
        k = min(self.top_k, n) if self.top_k else n
        keep = k
        if self.min_p > 0:
            keep = min(keep, int(np.count_nonzero(logits >= best + math.log(self.min_p))))
        if self.top_p >= 1:
            ids = _best(logits, best, keep)
            return ids, logits[ids]
        total = _mass(logits, best, k)
        for ids in _prefixes(logits, best, keep):
            cum = np.cumsum(np.exp(logits[ids].astype(np.float64) - best)) / total
            if cum[-1] >= self.top_p or len(ids) == keep:
                ids = ids[: min(int(np.searchsorted(cum, self.top_p)) + 1, len(ids))]
                return ids, logits[ids]
        raise AssertionError("unreachable: the last prefix is keep long")


def _draw(weights: np.ndarray, u: float) -> int:
    """The index where the cumulative weight first passes u times the total (inverse CDF).

    Block sums first, then the cumulative sum inside one block: a float64 cumulative sum
    over gemma's 262k weights costs 1 ms, this a fifth of it.
    """
    starts = np.arange(0, len(weights), _BLOCK)
    cum = np.cumsum(np.add.reduceat(weights, starts))
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    inner = np.cumsum(weights[starts[b] : starts[b] + _BLOCK])
    i = int(np.searchsorted(inner, target - (cum[b - 1] if b else 0.0), side="right"))
    return int(starts[b]) + min(i, len(inner) - 1)


def _top(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, largest first, ties broken by the smaller id."""
    ids = np.arange(len(logits)) if k >= len(logits) else np.argpartition(logits, -k)[-k:]
    return _ordered(ids, logits)


def _ordered(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return ids[np.lexsort((ids, -logits[ids]))]


def _prefixes(logits: np.ndarray, best: float, keep: int) -> Iterator[np.ndarray]:
    """Ever longer prefixes of the row's ids sorted best first, the last one `keep` long.

    Every token within a gap of the best, in order, is such a prefix (ties included), so
    these come first while they are short.
    """
    for gap in _GAPS:
        near = np.flatnonzero(logits >= best - gap)
        if not 0 < len(near) <= _HEAD:  # none: a NaN best, which the partition below still orders
            break
        yield _ordered(near, logits)[:keep]
        if len(near) >= keep:
            return
    if _HEAD < keep:
        yield _top(logits, _HEAD)
    yield _top(logits, keep)


def _mass(logits: np.ndarray, best: float, k: int) -> float:
    """Sum of exp(logit - best) over the k largest logits.

    The exponentials in float32 (each within 1e-7 of float64's, as llama.cpp's own softmax
    computes them), summed in float64: for gemma-3-270m's 262k vocabulary this made a sampled
    token 2 ms cheaper than float64 throughout.
    """
    vals = logits if k >= len(logits) else logits[_best(logits, best, k)]
    return float(np.exp(vals - np.float32(best), dtype=np.float32).sum(dtype=np.float64))


def _best(logits: np.ndarray, best: float, k: int) -> np.ndarray:
    """Ids of the k largest logits (the first prefix at least k long)."""
    return next(ids for ids in _prefixes(logits, best, k) if len(ids) == k)


class Replay:
    """Commits the given tokens in order, whatever the rows say; past them, the argmax.

    Greedy verification against a known text: a method's drafts are verified (and timed) as
    usual, but the text it commits is `tokens`, so methods that would part at a near-tie
    (batched and one-token decoding differ in the last bits) are measured on the same text.
    """

    greedy = True
    needs_full_rows = False

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens, self.at = [int(t) for t in tokens], 0

    def __call__(self, row: np.ndarray | TopK) -> int:
        self.at += 1
        return self.tokens[self.at - 1] if self.at <= len(self.tokens) else best(row)
