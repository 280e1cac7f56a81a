"""Tests for the RACER retrieval index and top-k rows (racer_local.ngram, native/ngram.c).

Three layers: hand-written cases and a brute-force oracle for the pure-Python twin; the C
extension against the twin on the same random op streams; and ngram.c itself under
AddressSanitizer/UBSan through native/asan_driver.c, again against the twin.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import racer_local
from racer_local import ngram
from racer_local.ngram import PyNgramIndex, min_nodes, py_topk_rows

try:
    from racer_local import _native
except ImportError as exc:  # the extension is optional; the twin is always there
    _native = None
    NATIVE_MISSING = f"racer_local._native is not built ({exc})"
else:
    NATIVE_MISSING = ""

needs_native = pytest.mark.skipif(_native is None, reason=NATIVE_MISSING)
NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
IMPLS = [
    pytest.param(PyNgramIndex, id="py"),
    pytest.param(getattr(_native, "NgramIndex", None), id="c", marks=needs_native),
]
TOPKS = [
    pytest.param(py_topk_rows, id="py"),
    pytest.param(getattr(_native, "topk_rows", None), id="c", marks=needs_native),
]


def kept_nodes(paths):
    """Every continuation the result keeps: all prefixes of its leaf paths."""
    return {tuple(path[: i + 1]) for path, _ in paths for i in range(len(path))}


def brute_scores(stream, root, window, min_match):
    """Spec, by brute force: a continuation's score sums the occurrences of border+c over
    every border (suffix of length k >= min_match-1 plus root) that occurs in the stream."""
    n, scores = len(stream), Counter()
    for k in range(min_match - 1, min(n, window - 1) + 1):
        border = stream[n - k :] + [root]
        for p in range(n - len(border) + 1):
            if stream[p : p + len(border)] == border:
                end = p + len(border)
                for length in range(1, window - len(border) + 1):
                    if end + length <= n:
                        scores[tuple(stream[end : end + length])] += 1
    return scores


# ---- hand-written cases, pure Python ----


def test_repeated_phrase_returns_its_continuation():
    index = PyNgramIndex()
    index.extend([1, 2, 3, 4, 5, 9, 1, 2])
    # borders [2,3] and [1,2,3] both saw 4 5 9 once: each token scores 1 + 1
    assert index.retrieve(3, 3) == [([4, 5, 9], 2)]


def test_min_match_is_respected():
    stream = [5, 1, 2, 6, 1]
    loose, strict = PyNgramIndex(min_match=2), PyNgramIndex(min_match=3)
    loose.extend(stream)
    strict.extend(stream)
    assert loose.retrieve(2, 2) == [([6, 1], 1)]
    assert strict.retrieve(2, 2) == []  # [6, 1, 2] never occurred
    unigram = PyNgramIndex(min_match=1)
    unigram.extend([3, 4, 9])
    assert unigram.retrieve(3, 1) == [([4], 1)]  # the root alone is a border


def test_budget_is_respected():
    index = PyNgramIndex()
    index.extend(list(range(20)) + [99] + list(range(5)))
    assert index.retrieve(5, 0) == []
    # five borders, [4,5] .. [0,1,2,3,4,5]; the window cuts deeper borders' continuations short
    assert index.retrieve(5, 2) == [([6, 7], 5)]
    assert index.retrieve(5, 8) == [([6, 7, 8, 9, 10, 11, 12, 13], 1)]
    for budget in range(1, 12):
        assert len(kept_nodes(index.retrieve(5, budget))) == min(budget, 8)  # 10 - border depth 2


def test_empty_stream_and_unknown_root():
    index = PyNgramIndex()
    assert index.retrieve(1, 16) == []
    index.extend([1, 2, 3])
    assert index.retrieve(42, 16) == []


def test_longer_matches_outrank_equal_frequency():
    # after "10 11 12 20" came 30; after "40 12 20" came 31; the context ends "10 11 12"
    index = PyNgramIndex()
    index.extend([10, 11, 12, 20, 30, 40, 12, 20, 31, 99, 10, 11, 12])
    assert index.retrieve(20, 1) == [([30], 3)]
    paths = index.retrieve(20, 64)
    assert paths[0][0][:2] == [30, 40] and paths[-1] == ([31, 99, 10, 11, 12], 1)


def test_len_reset_and_node_count():
    index = PyNgramIndex(window=3)
    index.extend([1, 2, 1, 2])
    assert len(index) == 4
    assert index.node_count == 1 + 2 + 2 + 2  # root; 1, 2; 12, 21; 121, 212
    index.reset()
    assert len(index) == 0 and index.node_count == 1 and index.retrieve(1, 4) == []


def test_eviction_keeps_the_cap_and_the_recent_context():
    window = 4
    index = PyNgramIndex(window=window, max_nodes=min_nodes(window))
    rng = random.Random(1)
    for _ in range(500):
        index.extend([rng.randrange(50)])
        assert index.node_count <= min_nodes(window)
    index.extend([7, 8, 9, 60, 7, 8])  # the phrase just seen is still indexed
    assert index.retrieve(9, 1) == [([60], 2)]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise(impl):
    with pytest.raises(ValueError, match="window"):
        impl(window=0)
    with pytest.raises(ValueError, match="min_match"):
        impl(window=3, min_match=4)
    with pytest.raises(ValueError, match="max_nodes"):
        impl(window=10, max_nodes=min_nodes(10) - 1)
    index = impl(window=10, max_nodes=min_nodes(10))
    with pytest.raises(ValueError, match="token ids"):
        index.extend([1, 2**31])
    with pytest.raises(ValueError, match="token ids"):
        index.extend([-1])
    with pytest.raises(TypeError):
        index.extend([1.5])
    assert len(index) == 0  # a bad token appends nothing
    with pytest.raises(ValueError, match="budget"):
        index.retrieve(1, -1)
    assert (index.window, index.max_nodes, index.min_match) == (10, min_nodes(10), 2)


def test_env_var_selects_the_implementation(monkeypatch):
    monkeypatch.setenv("RACER_LOCAL_NATIVE", "0")
    assert ngram._select() == (False, PyNgramIndex, py_topk_rows)
    monkeypatch.setenv("RACER_LOCAL_NATIVE", "yes")
    with pytest.raises(ValueError, match="RACER_LOCAL_NATIVE"):
        ngram._select()
    # as if the extension were not built
    monkeypatch.delattr(racer_local, "_native", raising=False)
    monkeypatch.setitem(sys.modules, "racer_local._native", None)
    monkeypatch.setenv("RACER_LOCAL_NATIVE", "1")
    with pytest.raises(ImportError, match="RACER_LOCAL_NATIVE=1"):
        ngram._select()
    monkeypatch.delenv("RACER_LOCAL_NATIVE")
    assert ngram._select()[0] is False


@needs_native
def test_env_var_default_prefers_c(monkeypatch):
    monkeypatch.delenv("RACER_LOCAL_NATIVE", raising=False)
    assert ngram._select() == (True, _native.NgramIndex, _native.topk_rows)
    monkeypatch.setenv("RACER_LOCAL_NATIVE", "1")
    assert ngram._select()[0] is True


# ---- the twin against a brute-force oracle ----


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(st.integers(0, 3), max_size=40),
    root=st.integers(0, 3),
    window=st.integers(1, 6),
    data=st.data(),
)
def test_retrieve_matches_brute_force(stream, root, window, data):
    min_match = data.draw(st.integers(1, window))
    budget = data.draw(st.integers(0, 30))
    index = PyNgramIndex(window=window, min_match=min_match)
    index.extend(stream)
    scores = brute_scores(stream, root, window, min_match)
    paths = index.retrieve(root, budget)
    kept = kept_nodes(paths)
    assert len(kept) == min(budget, len(scores))
    assert all(scores[path] == score for path, score in ((tuple(p), s) for p, s in paths))
    if kept:  # a top set: nothing left out scores above anything kept
        left_out = [s for c, s in scores.items() if c not in kept]
        assert max(left_out, default=0) <= min(scores[c] for c in kept)
    if budget >= len(scores):
        leaves = [c for c in scores if not any(d[:-1] == c for d in scores)]
        assert paths == sorted(((list(c), scores[c]) for c in leaves), key=lambda p: (-p[1], p[0]))


# ---- C against the twin ----

TOKEN_KINDS = {
    "small": st.integers(0, 4),
    "large": st.sampled_from([0, 1, 262_142, 262_143]) | st.integers(0, 262_143),
    "single": st.just(7),
}


@st.composite
def scenarios(draw):
    window = draw(st.sampled_from([1, 2, 3, 4, 10]))
    min_match = draw(st.integers(1, window))
    small_cap = draw(st.booleans())
    max_nodes = min_nodes(window) + draw(st.integers(0, 20)) if small_cap else 100_000
    token = TOKEN_KINDS[draw(st.sampled_from(sorted(TOKEN_KINDS)))]
    extend = st.tuples(st.just("extend"), st.lists(token, max_size=15))
    retrieve = st.tuples(st.just("retrieve"), token, st.integers(0, 40))
    reset = st.just(("reset",))
    op = st.sampled_from([extend] * 10 + [retrieve] * 9 + [reset]).flatmap(lambda s: s)
    return window, max_nodes, min_match, draw(st.lists(op, max_size=60))


def replay(impl, window, max_nodes, min_match, ops):
    index, out = impl(window=window, max_nodes=max_nodes, min_match=min_match), []
    for op in ops:
        if op[0] == "extend":
            index.extend(op[1])
        elif op[0] == "retrieve":
            out.append(index.retrieve(op[1], op[2]))
            out.append(index.retrieve_nodes(op[1], op[2]))
        else:
            index.reset()
        out.append((len(index), index.node_count))
    return out


@needs_native
@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_c_matches_python_on_random_ops(scenario):
    assert replay(_native.NgramIndex, *scenario) == replay(PyNgramIndex, *scenario)


def text_like_stream(rng, n, vocab=262_144):
    """Zipf-ish tokens with copied phrases, like prose or code that repeats itself."""
    ranks = np.arange(1, 2001)
    words = rng.choice(vocab, size=2000, replace=False)
    probs = 1.0 / ranks
    probs /= probs.sum()
    out = []
    while len(out) < n:
        if out and rng.random() < 0.3:
            start = int(rng.integers(0, len(out)))
            out.extend(out[start : start + int(rng.integers(3, 20))])
        else:
            out.extend(int(t) for t in rng.choice(words, size=int(rng.integers(1, 10)), p=probs))
    return out[:n]


@needs_native
@pytest.mark.parametrize("window,max_nodes", [(10, min_nodes(10)), (10, 500), (4, 100_000)])
def test_c_matches_python_on_a_long_stream_with_eviction(window, max_nodes):
    rng = np.random.default_rng(7)
    stream = text_like_stream(rng, 3000)
    c = _native.NgramIndex(window=window, max_nodes=max_nodes)
    py = PyNgramIndex(window=window, max_nodes=max_nodes)
    i = 0
    while i < len(stream):
        step = int(rng.integers(1, 6))
        for index in (c, py):
            index.extend(stream[i : i + step])
        i += step
        root, budget = (stream[i] if i < len(stream) else 0), int(rng.integers(0, 65))
        assert c.retrieve(root, budget) == py.retrieve(root, budget)
        assert c.retrieve_nodes(root, budget) == py.retrieve_nodes(root, budget)
        assert c.node_count == py.node_count <= max_nodes


@needs_native
def test_c_accepts_numpy_ints_and_iterables():
    c, py = _native.NgramIndex(), PyNgramIndex()
    for index in (c, py):
        index.extend(np.array([1, 2, 3, 1, 2], dtype=np.int32))
        index.extend(iter([4, 1]))
    assert c.retrieve(np.int64(2), np.int64(4)) == py.retrieve(2, 4) == [([3, 1], 1), ([4, 1], 1)]


# ---- top-k rows ----


def reference_topk(logits, k):
    clean = np.where(np.isnan(logits), -np.inf, logits)
    cols = np.arange(logits.shape[1])
    return np.array([np.lexsort((cols, -row))[:k] for row in clean], dtype=np.int32).reshape(-1, k)


@pytest.mark.parametrize("topk", TOPKS)
@pytest.mark.parametrize("seed", range(20))
def test_topk_rows_matches_reference(topk, seed):
    rng = np.random.default_rng(seed)
    n, vocab = int(rng.integers(0, 5)), int(rng.choice([1, 7, 33, 1000]))
    logits = rng.integers(-3, 4, size=(n, vocab)).astype(np.float32)  # many ties
    special = rng.random((n, vocab))
    logits[special < 0.1] = np.nan
    logits[(special >= 0.1) & (special < 0.15)] = -np.inf
    logits[(special >= 0.15) & (special < 0.17)] = np.inf
    if seed % 2:
        logits += rng.standard_normal((n, vocab)).astype(np.float32)
    k = int(rng.integers(1, vocab + 1))
    out = topk(logits, k)
    assert out.dtype == np.int32 and out.shape == (n, k)
    np.testing.assert_array_equal(out, reference_topk(logits, k))


@needs_native
def test_topk_rows_c_matches_python_on_a_vocab_row():
    logits = np.random.default_rng(0).standard_normal((8, 262_144)).astype(np.float32)
    logits[3, :] = 1.0  # all tied
    logits[5, 100:200] = np.nan
    np.testing.assert_array_equal(_native.topk_rows(logits, 8), py_topk_rows(logits, 8))
    np.testing.assert_array_equal(_native.topk_rows(logits, 8), reference_topk(logits, 8))


@pytest.mark.parametrize("topk", TOPKS)
def test_topk_rows_rejects_bad_input(topk):
    good = np.zeros((2, 5), dtype=np.float32)
    for bad in (good.astype(np.float64), good[:, ::2], good[0], [[0.0] * 5], "text"):
        with pytest.raises(TypeError, match="C-contiguous 2-D float32"):
            topk(bad, 2)
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must be between 1 and the row length 5"):
            topk(good, k)


# ---- ngram.c under AddressSanitizer ----


def asan_script(seed=3, n_ops=1500):
    """(stdin text, ops) for asan_driver.c: a small cap so eviction runs all the time."""
    rng = random.Random(seed)
    window, max_nodes, min_match = 4, min_nodes(4) + 5, 2
    lines, ops = [f"{window} {max_nodes} {min_match}"], []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.5:
            n = rng.randint(0, 8)
            tokens = [rng.choice([rng.randrange(6), rng.randrange(262_144)]) for _ in range(n)]
            ops.append(("e", tokens))
            lines.append(" ".join(map(str, ["e", len(tokens), *tokens])))
        elif r < 0.9:
            root, budget = rng.randrange(6), rng.randint(0, 30)
            ops.append(("r", root, budget))
            lines.append(f"r {root} {budget}")
        elif r < 0.99:
            rows, cols = rng.randint(1, 3), rng.randint(1, 40)
            k = rng.randint(1, cols)
            choices = [-2.0, -1.0, 0.0, 1.0, 2.0, float("nan"), float("-inf"), float("inf")]
            values = [rng.choice(choices) for _ in range(rows * cols)]
            ops.append(("t", np.array(values, dtype=np.float32).reshape(rows, cols), k))
            lines.append(" ".join(["t", str(rows), str(cols), str(k), *map(str, values)]))
        else:
            ops.append(("x",))
            lines.append("x")
    return "\n".join(lines) + "\n", (window, max_nodes, min_match), ops


def python_transcript(params, ops):
    """What asan_driver.c must print for the same ops, from the twin."""
    index, out = PyNgramIndex(*params), []
    for op in ops:
        if op[0] == "e":
            index.extend(op[1])
            out.append(f"E {len(index)} {index.node_count}")
        elif op[0] == "r":
            paths = index.retrieve(op[1], op[2])
            out.append(f"R {len(paths)}")
            out.extend(" ".join(map(str, [score, *path])) for path, score in paths)
        elif op[0] == "t":
            ids = py_topk_rows(op[1], op[2])
            out.append(f"T {len(ids)}")
            out.extend(" ".join(map(str, row)) for row in ids)
        else:
            index.reset()
            out.append("X")
    return "\n".join(out) + "\n"


def test_ngram_c_under_address_sanitizer(tmp_path):
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("no C compiler found")
    driver = tmp_path / "asan_driver"
    sanitize = [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ]
    sources = [str(NATIVE_DIR / "ngram.c"), str(NATIVE_DIR / "asan_driver.c")]
    build = [compiler, "-std=c99", "-g", "-O1", *sanitize, f"-I{NATIVE_DIR}", *sources, "-lm"]
    subprocess.run([*build, "-o", str(driver)], check=True, capture_output=True, text=True)
    stdin, params, ops = asan_script()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run(
        [driver], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout == python_transcript(params, ops)


@pytest.mark.parametrize("impl", IMPLS)
def test_retrieve_nodes_scores_every_kept_node(impl):
    index = impl(window=10, max_nodes=1000)
    index.extend(list(range(1, 21)) + [1, 2, 3, 4, 5])
    # The matched suffixes [5,6] .. [1..5,6] each count the copy once; the window cuts the
    # deeper borders' continuations, so the scores fall with depth.
    assert index.retrieve_nodes(6, 16) == [
        (7, -1, 5), (8, 0, 5), (9, 1, 5), (10, 2, 5), (11, 3, 4), (12, 4, 3), (13, 5, 2), (14, 6, 1)
    ]
