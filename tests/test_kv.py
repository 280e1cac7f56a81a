"""Tree verification on the real model: one batched decode of a branching tree, then a commit
that leaves exactly the prefix plus the accepted path in llama.cpp's KV cache."""

from __future__ import annotations

import numpy as np

from racer_local.decode import _commit, _rollback, _verify
from racer_local.tree import DraftTree
from racer_local.verify import walk

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


def _greedy(backend, prompt, n):
    """Plain one-token greedy decoding: the tokens and the logits row after each one."""
    backend.clear()
    rows = backend.prefill(prompt, 0)
    x, tokens, after = int(rows[-1].argmax()), [], []
    for i in range(n):
        tokens.append(x)
        row = backend.decode([x], [len(prompt) + i])[0].copy()
        after.append(row)
        x = int(row.argmax())
    return tokens, after


def test_a_branching_tree_commits_only_its_accepted_path(engine):
    b = engine.backend
    engine.reset()
    engine.read_rows(needs_full_rows=True)  # full rows, whatever the last generation read
    prompt = b.tokenize(PROMPT)
    n = len(prompt)
    truth, after = _greedy(b, prompt, 5)
    wrong = [t for t in b.tokenize(" the of and a in to", add_special=False) if t not in truth]
    # The true continuation sits on the SECOND branch under the root (so its path id is not 1),
    # beside wrong siblings at every depth.
    tree = DraftTree.build(
        truth[0],
        [[wrong[0], wrong[1]], [truth[1], wrong[2]], [truth[1], truth[2], truth[3]], [wrong[3]]],
    )
    assert tree.n_leaves == 4 and tree.seq_ids[0] == (1, 2, 3, 4)

    engine.reset()
    b.prefill(prompt, 0)
    rows = _verify(b, tree, n)
    path, bonus = walk(tree, rows, lambda r: int(r.argmax()))
    assert [tree.tokens[i] for i in path] == truth[:4]
    assert bonus == truth[4]
    # The verified rows match one-token decoding of the same tokens (up to kernel drift).
    for depth, node in enumerate(path):
        assert int(rows[node].argmax()) == int(after[depth].argmax())

    _commit(b, tree, path, n)
    assert b.pos_max(0) == n + len(path) - 1
    assert all(b.pos_max(seq) == -1 for seq in range(1, b.n_seq_max))

    # Decoding continues from the committed state as if the path had been decoded plainly.
    row = b.decode([bonus], [n + len(path)])[0]
    assert int(row.argmax()) == int(after[4].argmax())
    assert np.abs(row - after[4]).max() < 2.0
    _rollback(b, n + len(path) + 1)
    engine.reset()


def test_rollback_drops_every_uncommitted_cell(engine):
    b = engine.backend
    engine.reset()
    prompt = b.tokenize(PROMPT)
    n = len(prompt)
    b.prefill(prompt, 0)
    tree = DraftTree.build(prompt[-1], [[1, 2, 3], [4, 5], [6]])
    _verify(b, tree, n)
    # The draft cells sit under path ids 1..3 (deepest path: 3 below the root) until rolled back.
    assert max(b.pos_max(seq) for seq in (1, 2, 3)) == n + 3
    assert b.pos_max(0) == n - 1
    _rollback(b, n)
    assert b.pos_max(0) == n - 1
    assert all(b.pos_max(seq) == -1 for seq in range(1, b.n_seq_max))
    engine.reset()
