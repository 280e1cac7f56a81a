"""Top-k rows: the k best tokens of each logits row, best first, with their logits.

Greedy verification reads one token per node (the best) and the copy-logit table the best k;
neither needs the vocabulary-wide row. So where the model runs on a GPU, the backend can take
the top k inside the compute graph and hand back only these (Backend.set_top_k), instead of
copying a full row per node to the host (gemma-3-270m: 262,144 floats, 1 MiB a node).
Sampling needs the whole distribution, and a repeat penalty can move the argmax, so both keep
full rows. Everything that reads rows takes either kind: `best` and `top` are the two reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from racer_local.ngram import topk_rows

WHERE = ("auto", "backend", "host")  # where a greedy generation takes the top k: Engine(candidates=)


@dataclass(frozen=True)
class TopK:
    ids: np.ndarray  # (n, k) or, for one row, (k,) token ids, best first (ties by smaller id)
    logits: np.ndarray  # the same shape, float32: their logits

    @classmethod
    def sorted(cls, ids: np.ndarray, logits: np.ndarray) -> TopK:
        """From unordered candidates (llama.cpp's top-k leaves its output unordered)."""
        order = np.lexsort((ids, -logits), axis=-1)
        return cls(np.take_along_axis(ids, order, -1), np.take_along_axis(logits, order, -1))

    @classmethod
    def concat(cls, parts: list[TopK]) -> TopK:
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.logits for p in parts]))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i) -> TopK:
        return TopK(self.ids[i], self.logits[i])

    def copy(self) -> TopK:
        return TopK(self.ids.copy(), self.logits.copy())

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def best(row) -> int:
    """The token with the highest logit in one row (full, or top-k)."""
    return int(row.ids[0]) if isinstance(row, TopK) else int(row.argmax())


def top(rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) of each row's best k, best first (full rows: ngram.topk_rows, in C when
    built)."""
    if isinstance(rows, TopK):
        if rows.k < k:
            raise ValueError(f"rows hold the best {rows.k} tokens, {k} were asked for")
        return rows.ids[:, :k], rows.logits[:, :k]
    ids = topk_rows(rows, k)
    return ids, np.take_along_axis(rows, ids, axis=1)


def margin(row) -> float:
    """How far the best logit of one row (full, or top-k) is ahead of the second."""
    if isinstance(row, TopK):
        return float(row.logits[0] - row.logits[1])
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])
