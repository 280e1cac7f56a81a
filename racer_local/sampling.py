"""Choosing a token from a logits row: argmax when greedy, a seeded draw otherwise.

The same chooser picks the first token after the prompt, walks the draft tree and picks the
bonus token, so every method (ar included) consumes randomness in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = whole vocabulary
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, row: np.ndarray) -> int:
        if self.greedy:
            return int(row.argmax())
        ids = np.argpartition(row, -self.top_k)[-self.top_k :] if self.top_k else np.arange(len(row))
        logits = row[ids].astype(np.float64) / self.temperature
        order = np.argsort(-logits, kind="stable")
        ids, logits = ids[order], logits[order]
        probs = np.exp(logits - logits[0])
        probs /= probs.sum()
        keep = len(probs)
        if self.top_p < 1:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1)
        if self.min_p > 0:
            keep = min(keep, int(np.count_nonzero(probs >= self.min_p * probs[0])))
        probs = probs[:keep] / probs[:keep].sum()
        return int(ids[self._rng.choice(keep, p=probs)])
