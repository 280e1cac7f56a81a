"""Top-k rows: the backend's top-k must be the host's, row for row, and every reader of rows
must take either kind (pure tests first, then the real model)."""

from __future__ import annotations

import numpy as np
import pytest

from racer_local import topk
from racer_local.drafters.racer import CopyLogitTable
from racer_local.sampling import Replay, Sampler
from racer_local.topk import TopK


def _full(seed: int = 0, n: int = 3, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, vocab)).astype(np.float32)


def test_sorted_puts_the_best_first_and_ties_by_smaller_id():
    rows = TopK.sorted(np.array([[4, 9, 2, 7]]), np.array([[1.0, 3.0, 3.0, 0.5]], dtype=np.float32))
    assert rows.ids.tolist() == [[2, 9, 4, 7]]
    assert rows.logits.tolist() == [[3.0, 3.0, 1.0, 0.5]]


def test_both_kinds_of_rows_read_alike():
    full = _full()
    ids, logits = topk.top(full, 5)
    rows = TopK(ids, logits)
    for i in range(len(full)):
        assert topk.best(rows[i]) == topk.best(full[i]) == int(full[i].argmax())
        assert topk.margin(rows[i]) == pytest.approx(topk.margin(full[i]))
    assert [topk.top(rows, 3)[0].tolist()] == [ids[:, :3].tolist()]
    with pytest.raises(ValueError, match="best 5 tokens, 8 were asked for"):
        topk.top(rows, 8)


def test_the_copy_logit_table_learns_the_same_from_either_kind():
    full, tokens = _full(1), [3, 11, 7]
    a, b = CopyLogitTable(50, 4), CopyLogitTable(50, 4)
    a.update(tokens, full)
    b.update(tokens, TopK(*topk.top(full, 8)))
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.gaps, b.gaps)


def test_the_copy_logit_table_answers_from_each_tokens_latest_row():
    """Its candidates are kept between reads: an update must replace what a read kept."""
    table, row = CopyLogitTable(50, 2), np.zeros((1, 50), dtype=np.float32)
    assert table.candidates(3) == []  # never seen
    row[0, [9, 4]] = 5.0, 1.0
    table.update([3], row)
    assert [t for t, _ in table.candidates(3)] == [9, 4]
    row[0, [9, 4, 20]] = 0.0, 0.0, 8.0
    table.update(np.array([3]), row)  # token ids as numpy ints, as a prompt's are
    assert [t for t, _ in table.candidates(3)][0] == 20


def test_a_table_left_by_a_finished_drafter_is_reused_empty():
    import gc

    class Owner:
        pass

    first, full = Owner(), _full(3, vocab=61)
    table = CopyLogitTable.fresh(61, 4, first)
    table.update([3, 11], full[:2])
    table.candidates(3)  # a kept read must not outlive the clear either
    del first
    gc.collect()
    second = Owner()
    again = CopyLogitTable.fresh(61, 4, second)
    assert again is table  # the same pages, already mapped
    assert again.candidates(3) == [] and again.candidates(11) == [] and not again.ids.any()
    assert CopyLogitTable.fresh(61, 4, Owner()) is not again  # never two live owners
    again.TOUCHED_CAP = 1  # past the cap it forgets which rows it wrote: clear() resets them all
    again.update([5, 6, 7], full)
    again.clear()
    assert not again.ids.any() and again.candidates(5) == []


def test_greedy_choosers_take_top_k_rows_and_samplers_refuse_them():
    full = _full(2)
    row = TopK(*topk.top(full, 4))[0]
    assert Sampler()(row) == int(full[0].argmax())
    assert Replay([5])(row) == 5 and Replay([])(row) == int(full[0].argmax())
    for settings in (dict(temperature=0.8), dict(repeat_penalty=1.1), dict(frequency_penalty=0.5),
                     dict(presence_penalty=-0.5)):
        with pytest.raises(ValueError, match="need full logits rows"):
            Sampler(**settings)(row)
    assert not Sampler().needs_full_rows and Sampler(temperature=0.7).needs_full_rows


# ----- the real model ------------------------------------------------------------------------


@pytest.fixture
def backend(engine):
    """The shared engine's backend, cold, reading full rows (whatever the last generation read)
    and left so."""
    engine.reset()
    engine.read_rows(needs_full_rows=True)
    yield engine.backend
    engine.read_rows(needs_full_rows=True)
    engine.reset()


def _tree_batch(backend, prompt: list[int]) -> np.ndarray | TopK:
    """The prompt, then a 4-node tree with two leaves (path ids 1 and 2): rows of every node."""
    backend.clear()
    backend.prefill(prompt, 0)
    n = len(prompt)
    backend.seq_cp(0, 1)
    backend.seq_cp(0, 2)
    try:
        rows = backend.decode(prompt[:4], [n, n + 1, n + 1, n + 2], [(1, 2), (1,), (2,), (2,)])
        return rows.copy()
    finally:
        backend.clear()


def test_the_backends_top_k_is_the_hosts_row_for_row(backend):
    """Through a tree batch: llama.cpp chooses a row's sampler by its first sequence id, so
    rows of several path ids must still come back in batch order, each its own."""
    prompt = backend.tokenize("The quick brown fox jumps over the lazy dog because")
    full = _tree_batch(backend, prompt)
    backend.set_top_k(8)
    rows = _tree_batch(backend, prompt)
    assert isinstance(rows, TopK) and rows.ids.shape == (4, 8)
    ids, logits = topk.top(full, 8)
    assert np.array_equal(rows.ids, ids)
    np.testing.assert_allclose(rows.logits, logits, rtol=0, atol=1e-4)
    assert len({tuple(r) for r in rows.ids.tolist()}) > 1  # the nodes' rows differ


def test_switching_modes_and_a_bad_k(backend):
    prompt = backend.tokenize("Hello there")
    backend.set_top_k(4)
    assert isinstance(backend.prefill(prompt, 0, n_logits=2), TopK)
    backend.set_top_k(0)
    backend.clear()
    assert backend.prefill(prompt, 0).shape == (1, backend.n_vocab)
    with pytest.raises(ValueError, match="top_k must be in 0.."):
        backend.set_top_k(-1)


def test_auto_keeps_whichever_path_measured_faster(engine, monkeypatch):
    """Measured on this machine (cached): auto follows the measurement, either way."""
    from racer_local import costmodel

    for pays in (True, False):
        monkeypatch.setattr(costmodel, "top_k_pays", lambda backend, k, pays=pays: pays)
        assert engine.top_k(needs_full_rows=False) == (8 if pays else 0)
        assert engine.top_k(needs_full_rows=True) == 0
    with pytest.raises(ValueError, match="candidates must be one of auto, backend, host"):
        engine.candidates = "gpu"


def test_the_cli_forces_either_path(model_path):
    import json

    from click.testing import CliRunner

    from racer_local.cli import main

    tokens = {}
    for where in ("host", "backend"):
        result = CliRunner().invoke(main, ["generate", "The capital of France is", "-m", str(model_path),
                                           "--threads", "2", "--n-ctx", "512", "--max-tokens", "12",
                                           "--method", "ar", "--candidates", where, "--json"])
        assert result.exit_code == 0, result.output
        tokens[where] = json.loads(result.stdout)["tokens"]
    assert tokens["backend"] == tokens["host"] and len(tokens["host"]) == 12
    bad = CliRunner().invoke(main, ["generate", "hi", "--candidates", "gpu"])
    assert bad.exit_code == 2 and "'gpu' is not one of 'auto', 'backend', 'host'" in bad.output


def test_auto_uses_full_rows_where_llama_cpp_refuses_the_top_k(engine, monkeypatch, tmp_path):
    """A backend that cannot sample in its graph (llama.cpp refuses a tensor split) costs auto
    nothing: it reads full rows, instead of failing every greedy generation."""
    from racer_local import costmodel
    from racer_local.errors import ModelError

    def refuse(k):
        if k:
            raise ModelError("llama.cpp cannot take top-k on this model's backend; use full rows")

    monkeypatch.setenv("RACER_LOCAL_HOME", str(tmp_path))  # measure afresh, cache nothing real
    monkeypatch.setattr(costmodel, "_top_k_memo", {})
    monkeypatch.setattr(engine.backend, "set_top_k", refuse)
    engine.candidates = "auto"
    assert engine.top_k(needs_full_rows=False) == 0
    assert engine.generate("The capital of France is", max_tokens=4, method="ar").stats.generated_tokens == 4
