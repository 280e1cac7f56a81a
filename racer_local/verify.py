"""The acceptance rule: walk the draft tree along the target's own choices.

At each node the target chooses its next token from that node's logits row (argmax when
greedy, one draw from its distribution when sampling); if a child holds that token the walk
moves there, else it stops and the chosen token becomes the next root. Drafts are
deterministic, so this single draw is exactly the sequential scheme (accept child c with its
residual probability, else zero it, renormalise and try the next; if all fail, draw the bonus
from the residual): both give token t with probability p(t), whatever the drafter proposed.

`choose(row)` is called only at the nodes the walk commits, in order, so a stateful chooser
(sampling.Sampler) sees the context at each node, tree path included, as its history.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from racer_local.tree import DraftTree


def walk(tree: DraftTree, rows: np.ndarray, choose: Callable[[np.ndarray], int]) -> tuple[list[int], int]:
    """Return the accepted node indices (root first) and the target's next token."""
    node, path = 0, [0]
    while True:
        token = choose(rows[node])
        child = tree.children[node].get(token)
        if child is None:
            return path, token
        path.append(child)
        node = child
