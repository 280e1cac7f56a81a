"""Draft trees and the acceptance walk, on hand-written trees and logits rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from racer_local.tree import DraftTree
from racer_local.verify import walk

# root 100; paths share the prefixes (1,) and (1, 2). As a trie:
#   100 -> 1 -> 2 -> 3
#                 -> 4
#            -> 5
#       -> 6
PATHS = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]


def branching() -> DraftTree:
    return DraftTree.build(100, PATHS)


def path_tokens(tree: DraftTree, i: int) -> list[int]:
    """Tokens from the root down to node i."""
    out = []
    while i >= 0:
        out.append(tree.tokens[i])
        i = tree.parents[i]
    return out[::-1]


def ancestors(tree: DraftTree, i: int) -> set[int]:
    out = set()
    while (i := tree.parents[i]) >= 0:
        out.add(i)
    return out


def check_seq_ids(tree: DraftTree) -> None:
    """The tree-attention invariants of seq_ids (see tree.py's docstring)."""
    ids = tree.seq_ids
    assert len(ids) == len(tree)
    leaves = [i for i in range(len(tree)) if not tree.children[i]]
    if len(leaves) == 1:
        assert ids == ((0,),) * len(tree)
        return
    # each leaf owns one path id; together they are 1..L
    assert all(len(ids[leaf]) == 1 for leaf in leaves)
    assert sorted(ids[leaf][0] for leaf in leaves) == list(range(1, len(leaves) + 1))
    assert set(ids[0]) == set(range(1, len(leaves) + 1))
    for i in range(len(tree)):
        below = {ids[leaf][0] for leaf in leaves if leaf == i or i in ancestors(tree, leaf)}
        assert set(ids[i]) == below, f"node {i} must carry exactly its leaves' ids"
        # llama.cpp masks a batch token by its first id: it must see itself and its ancestors only
        first, depth = ids[i][0], tree.depths[i]
        seen = {j for j in range(len(tree)) if first in ids[j] and tree.depths[j] <= depth}
        assert seen == ancestors(tree, i) | {i}


# ----- build ------------------------------------------------------------------------------------


def test_build_merges_identical_prefixes_breadth_first():
    tree = branching()
    assert tree.tokens == (100, 1, 6, 2, 5, 3, 4)
    assert tree.parents == (-1, 0, 0, 1, 1, 3, 3)
    assert tree.depths == (0, 1, 1, 2, 2, 3, 3)
    assert sorted(path_tokens(tree, i) for i in range(len(tree)) if not tree.children[i]) == sorted(
        [[100, *p] for p in PATHS]
    )


def test_build_of_duplicate_paths_is_one_chain():
    tree = DraftTree.build(7, [[1, 2], [1, 2], [1]])
    assert tree.tokens == (7, 1, 2)
    assert tree.parents == (-1, 0, 1)
    assert tree.n_leaves == 1


def test_build_without_paths_is_the_root_alone():
    tree = DraftTree.build(7, [])
    assert tree.tokens == (7,)
    assert tree.n_leaves == 1
    assert tree.seq_ids == ((0,),)


def test_max_nodes_keeps_earlier_paths_and_cuts_the_first_that_does_not_fit():
    # 0 -> 1 -> 2 -> 3 (4 nodes), then 4 fits, 5 does not, and the later 9 loses to both
    tree = DraftTree.build(0, [[1, 2, 3], [4, 5, 6], [1, 2, 9]], max_nodes=5)
    assert len(tree) == 5
    assert tree.tokens == (0, 1, 4, 2, 3)
    assert tree.parents == (-1, 0, 0, 1, 3)


def test_max_nodes_counts_the_root():
    assert DraftTree.build(0, [[1, 2]], max_nodes=1).tokens == (0,)
    assert DraftTree.build(0, [[1, 2]], max_nodes=2).tokens == (0, 1)


def test_max_depth_cuts_every_path():
    tree = DraftTree.build(0, [[1, 2, 3, 4], [5, 6, 7]], max_depth=2)
    assert tree.tokens == (0, 1, 5, 2, 6)
    assert max(tree.depths) == 2
    assert DraftTree.build(0, [[1, 2]], max_depth=0).tokens == (0,)


@settings(max_examples=200, deadline=None)
@given(
    root=st.integers(0, 3),
    paths=st.lists(st.lists(st.integers(0, 3), max_size=5), max_size=8),
    max_nodes=st.none() | st.integers(1, 12),
    max_depth=st.none() | st.integers(0, 5),
)
def test_build_invariants(root, paths, max_nodes, max_depth):
    tree = DraftTree.build(root, paths, max_nodes=max_nodes, max_depth=max_depth)
    assert tree.tokens[0] == root
    assert all(p < i for i, p in enumerate(tree.parents) if i)  # parent before child
    assert list(tree.depths) == sorted(tree.depths)  # breadth-first
    if max_nodes is not None:
        assert len(tree) <= max_nodes
    if max_depth is not None:
        assert max(tree.depths) <= max_depth
    # every node is a kept prefix of some path; without limits every path is in the tree
    prefixes = {(root,)} | {(root, *p[:k]) for p in paths for k in range(len(p) + 1)}
    nodes = {tuple(path_tokens(tree, i)) for i in range(len(tree))}
    assert len(nodes) == len(tree)  # identical prefixes merged
    assert nodes <= prefixes
    if max_nodes is None and max_depth is None:
        assert nodes == prefixes
    check_seq_ids(tree)


# ----- chain, limit, children, leaves -------------------------------------------------------------


def test_chain():
    tree = DraftTree.chain(7, [8, 9])
    assert tree.tokens == (7, 8, 9)
    assert tree.parents == (-1, 0, 1)
    assert tree.depths == (0, 1, 2)
    assert tree.children == ({8: 1}, {9: 2}, {})
    assert tree.n_leaves == 1
    assert DraftTree.chain(7).tokens == (7,)


def test_children_map_and_leaves():
    tree = branching()
    assert tree.children == ({1: 1, 6: 2}, {2: 3, 5: 4}, {}, {3: 5, 4: 6}, {}, {}, {})
    assert tree.n_leaves == 4


def test_limit_keeps_a_breadth_first_prefix():
    tree = branching()
    small = tree.limit(4, 10)
    assert small.tokens == (100, 1, 6, 2)
    assert small.parents == (-1, 0, 0, 1)
    assert small.children == ({1: 1, 6: 2}, {2: 3}, {}, {})
    assert small.n_leaves == 2
    shallow = tree.limit(10, 1)
    assert shallow.tokens == (100, 1, 6)
    assert tree.limit(7, 3) is tree
    assert tree.limit(100, 0).tokens == (100,)
    assert DraftTree.chain(1, [2, 3, 4]).limit(10, 2).tokens == (1, 2, 3)


def test_constructor_rejects_what_the_loop_cannot_decode():
    with pytest.raises(ValueError):
        DraftTree((1, 2), (0, -1))  # root not first
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1, 1))  # own parent
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1, -2))
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1,))
    with pytest.raises(ValueError):
        DraftTree((), ())
    with pytest.raises(ValueError):
        DraftTree((1, 2, 2), (-1, 0, 0))  # two identical siblings
    with pytest.raises(ValueError):
        DraftTree((1, 2, 3, 4), (-1, 0, 1, 0))  # depth-first: limit() would exceed max_depth


# ----- sequence ids -------------------------------------------------------------------------------


def test_chain_lives_in_sequence_zero():
    assert DraftTree.chain(7, [8, 9]).seq_ids == ((0,), (0,), (0,))
    assert DraftTree.chain(7).seq_ids == ((0,),)


def test_seq_ids_of_a_branching_tree():
    tree = branching()
    ids = tree.seq_ids
    assert set(ids[0]) == {1, 2, 3, 4}
    leaf_ids = {tree.tokens[i]: ids[i] for i in range(len(tree)) if not tree.children[i]}
    assert sorted(leaf_ids.values()) == [(1,), (2,), (3,), (4,)]
    # node "2" (index 3) has leaves 3 and 4 below it; node "1" has those and 5
    assert set(ids[3]) == set(leaf_ids[3] + leaf_ids[4])
    assert set(ids[1]) == set(leaf_ids[3] + leaf_ids[4] + leaf_ids[5])
    check_seq_ids(tree)


def test_seq_ids_of_a_wide_and_a_deep_tree():
    check_seq_ids(DraftTree.build(0, [[t] for t in range(1, 10)]))
    check_seq_ids(DraftTree.build(0, [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7]]))


# ----- the acceptance walk ------------------------------------------------------------------------

VOCAB = 128


def rows_choosing(tree: DraftTree, choice: dict[int, int]) -> np.ndarray:
    """Logits rows whose argmax at node i is choice[i] (a random-ish filler elsewhere)."""
    rows = np.random.default_rng(0).normal(size=(len(tree), VOCAB)).astype(np.float32)
    for i, token in choice.items():
        rows[i, token] = rows[i].max() + 1.0
    return rows


def argmax(row: np.ndarray) -> int:
    return int(row.argmax())


def test_walk_accepts_the_longest_matching_chain_and_returns_the_bonus_token():
    tree = DraftTree.chain(5, [1, 2, 3])
    assert walk(tree, rows_choosing(tree, {0: 1, 1: 2, 2: 7, 3: 9}), argmax) == ([0, 1, 2], 7)
    assert walk(tree, rows_choosing(tree, {0: 1, 1: 2, 2: 3, 3: 9}), argmax) == ([0, 1, 2, 3], 9)


def test_walk_stops_at_the_root_when_no_child_matches():
    tree = branching()
    assert walk(tree, rows_choosing(tree, {0: 9}), argmax) == ([0], 9)


def test_walk_follows_the_branch_the_target_chooses():
    tree = branching()  # 100 -> 1 -> {2 -> {3, 4}, 5}, 6
    path, bonus = walk(tree, rows_choosing(tree, {0: 1, 1: 2, 3: 4, 6: 11}), argmax)
    assert [tree.tokens[i] for i in path] == [100, 1, 2, 4]
    assert bonus == 11
    path, bonus = walk(tree, rows_choosing(tree, {0: 1, 1: 5, 4: 12}), argmax)
    assert [tree.tokens[i] for i in path] == [100, 1, 5]
    assert bonus == 12
    path, bonus = walk(tree, rows_choosing(tree, {0: 6, 2: 13}), argmax)
    assert [tree.tokens[i] for i in path] == [100, 6]
    assert bonus == 13


def test_walk_matches_by_token_under_the_current_node_only():
    # 5 exists at depth 2 under 1, but not under 6: choosing 6 then 5 must stop after 6
    tree = DraftTree.build(0, [[1, 5], [6, 8]])
    path, bonus = walk(tree, rows_choosing(tree, {0: 6, 2: 5}), argmax)
    assert [tree.tokens[i] for i in path] == [0, 6]
    assert bonus == 5
