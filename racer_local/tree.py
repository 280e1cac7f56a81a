"""Draft trees: a trie of candidate continuations below a known root token.

A tree is stored flat in breadth-first order (node 0 is the root, a parent always precedes
its children), which is the order llama.cpp receives it in. For tree attention every
root-to-leaf path gets its own KV sequence id (1..n_leaves); a node carries the ids of all
paths through it, and llama.cpp lets it attend to the cells sharing its FIRST id, i.e. the
committed prefix (copied into every path id) and its own ancestors. A chain needs no ids of
its own: it is decoded straight into sequence 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # parent index per node, -1 for the root
    depths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.tokens) == 0 or len(self.tokens) != len(self.parents):
            raise ValueError("a tree needs a root and exactly one parent index per token")
        depths, siblings = [], set()
        for i, p in enumerate(self.parents):
            if (i == 0) != (p == -1) or not -1 <= p < i:
                raise ValueError("a tree is breadth-first with the root alone at index 0")
            if (p, self.tokens[i]) in siblings:  # children() and seq_ids() would lose a node
                raise ValueError(f"node {p} has two children with token {self.tokens[i]}")
            siblings.add((p, self.tokens[i]))
            depths.append(0 if p < 0 else depths[p] + 1)
            if depths[-1] < depths[i - 1]:  # limit() keeps a prefix: it must be breadth-first
                raise ValueError("a tree is breadth-first: depths must not decrease")
        object.__setattr__(self, "depths", tuple(depths))

    @classmethod
    def build(
        cls,
        root: int,
        paths: Iterable[Sequence[int]],
        *,
        max_nodes: int | None = None,
        max_depth: int | None = None,
    ) -> DraftTree:
        """Merge paths below `root` into a trie, earlier paths first, within the limits.

        Identical prefixes collapse; a path that would exceed `max_nodes` is cut where the
        budget runs out, so the order of `paths` is their priority.
        """
        tokens, parents, depths, kids = [root], [-1], [0], [{}]
        for path in paths:
            node = 0
            for token in path[:max_depth]:
                child = kids[node].get(token)
                if child is None:
                    if max_nodes is not None and len(tokens) >= max_nodes:
                        break
                    child = len(tokens)
                    kids[node][token] = child
                    tokens.append(token)
                    parents.append(node)
                    depths.append(depths[node] + 1)
                    kids.append({})
                node = child
        order = sorted(range(len(tokens)), key=lambda i: (depths[i], i))
        rank = {old: new for new, old in enumerate(order)}
        return cls(
            tuple(tokens[i] for i in order),
            tuple(-1 if parents[i] < 0 else rank[parents[i]] for i in order),
        )

    @classmethod
    def chain(cls, root: int, draft: Sequence[int] = ()) -> DraftTree:
        return cls((root, *draft), tuple(range(-1, len(draft))))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def children(self) -> tuple[dict[int, int], ...]:
        """token -> child index, per node: what the verification walk looks up."""
        kids: list[dict[int, int]] = [{} for _ in self.tokens]
        for i, p in enumerate(self.parents[1:], start=1):
            kids[p][self.tokens[i]] = i
        return tuple(kids)

    @cached_property
    def n_leaves(self) -> int:
        return sum(1 for k in self.children if not k)

    def limit(self, max_nodes: int, max_depth: int) -> DraftTree:
        """The breadth-first prefix within the limits (a prefix of a BFS order is a tree)."""
        n = min(max_nodes, sum(1 for d in self.depths if d <= max_depth))
        if n == len(self):
            return self
        return DraftTree(self.tokens[:n], self.parents[:n])

    @cached_property
    def seq_ids(self) -> tuple[tuple[int, ...], ...]:
        """KV sequence ids per node: (0,) everywhere for a chain, else its leaves' path ids."""
        if self.n_leaves == 1:
            return ((0,),) * len(self)
        ids: list[list[int]] = [[] for _ in self.tokens]
        leaf_id = 0
        for i in range(len(self)):
            if not self.children[i]:
                leaf_id += 1
                node = i
                while node >= 0:
                    ids[node].append(leaf_id)
                    node = self.parents[node]
        return tuple(tuple(sorted(x)) for x in ids)
