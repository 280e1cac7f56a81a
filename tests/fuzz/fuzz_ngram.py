"""Differential fuzzing of the C NgramIndex/topk_rows (racer_local._native) against the Python twin.

`check(data)` decodes bytes into index parameters and a sequence of operations (extend,
retrieve, retrieve_nodes, reset, bad tokens, bad budgets, top-k over odd float rows), runs
them on both implementations and raises AssertionError at the first disagreement. Run as a
script it is an atheris (libFuzzer) target:

    .venv/bin/python tests/fuzz/fuzz_ngram.py -max_total_time=60 tests/fuzz_corpus/

atheris guides itself by coverage of the Python twin (the C code is not instrumented), which
tracks the same branches: eviction, borders, budget cuts, ties. tests/test_fuzz_ngram.py
replays tests/fuzz_corpus/ and runs a bounded seeded loop of random inputs; left out here:
memory errors inside ngram.c, which test_ngram.py's AddressSanitizer build covers.
"""

from __future__ import annotations

import sys

import numpy as np

if __name__ == "__main__":  # coverage feedback from the twin: instrument it as it is imported
    import atheris

    with atheris.instrument_imports(include=["racer_local.ngram"]):
        from racer_local.ngram import PyNgramIndex, min_nodes, py_topk_rows
else:
    from racer_local.ngram import PyNgramIndex, min_nodes, py_topk_rows
from racer_local import _native  # noqa: E402

TOKEN_MAX = 2**31 - 1
WINDOWS = (1, 1, 2, 3, 4, 10, 32)


class Bytes:
    """Reads small integers off a byte string; past its end every read is 0."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def __bool__(self) -> bool:
        return self.at < len(self.data)

    def byte(self) -> int:
        value = self.data[self.at] if self.at < len(self.data) else 0
        self.at += 1
        return value

    def int(self, n_bytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(n_bytes)), "little")


def _token(src: Bytes, alphabet: int) -> int:
    """Tokens from one of four alphabets: tiny (many repeats), near 2**31-1, vocab-sized, mixed."""
    b = src.byte()
    if alphabet == 0:
        return b % 3
    if alphabet == 1:
        return TOKEN_MAX - b % 4
    if alphabet == 2:
        return src.int(3) % 262_144
    return (b % 5, TOKEN_MAX - b % 3, src.int(4) & TOKEN_MAX)[b % 3] if b % 7 else 0


def _same(c_fn, py_fn, *args):
    """c_fn(*args) and py_fn(*args) must give equal results, or raise the same exception type."""
    try:
        want = py_fn(*args)
    except (ValueError, TypeError, OverflowError) as exc:
        want = exc
    try:
        got = c_fn(*args)
    except (ValueError, TypeError, OverflowError) as exc:
        got = exc
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want), f"C gave {got!r}, Python gave {want!r}"
        return None
    if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want, f"C gave {got!r}, Python gave {want!r}"
    return want


def _rows(src: Bytes) -> np.ndarray:
    """A small float32 matrix with ties, NaN, infinities and signed zeros."""
    n_rows, n_cols = 1 + src.byte() % 3, 1 + src.byte() % 12
    specials = np.array([0.0, -0.0, 1.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 3.5], dtype=np.float32)
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    for i in range(n_rows):
        for j in range(n_cols):
            b = src.byte()
            out[i, j] = specials[b % len(specials)] if b & 1 else np.float32((b >> 1) - 64) / 8
    return out


def check(data: bytes) -> int:
    """Run the ops `data` encodes on both implementations; return how many ops ran."""
    src = Bytes(data)
    window = WINDOWS[src.byte() % len(WINDOWS)]
    min_match = 1 + src.byte() % window
    cap = src.byte()
    max_nodes = min_nodes(window) + cap % 24 if cap < 200 else 100_000
    alphabet = src.byte() % 4
    c = _native.NgramIndex(window=window, max_nodes=max_nodes, min_match=min_match)
    py = PyNgramIndex(window=window, max_nodes=max_nodes, min_match=min_match)
    n_ops = 0
    while src and n_ops < 200:
        n_ops += 1
        op = src.byte() % 16
        if op < 7:  # extend
            tokens = [_token(src, alphabet) for _ in range(src.byte() % 24)]
            _same(c.extend, py.extend, tokens)
        elif op <= 10:  # retrieve / retrieve_nodes; op 10 with edge budgets
            root, budget = _token(src, alphabet), src.byte() % 48
            if op == 10:
                budget = (TOKEN_MAX, 0, 1)[src.byte() % 3]
            _same(c.retrieve, py.retrieve, root, budget)
            _same(c.retrieve_nodes, py.retrieve_nodes, root, budget)
        elif op == 11:
            c.reset()
            py.reset()
        elif op == 12:  # a bad token among good ones: refused, nothing appended
            bad = (2**31, -1, 2**63, -(2**31))[src.byte() % 4]
            tokens = [_token(src, alphabet), bad, _token(src, alphabet)]
            _same(c.extend, py.extend, tokens)
        elif op == 13:  # bad budget or root
            root, budget = ((1, -1), (2**31, 3), (-1, 3))[src.byte() % 3]
            _same(c.retrieve, py.retrieve, root, budget)
            _same(c.retrieve_nodes, py.retrieve_nodes, root, budget)
        else:  # top-k over odd rows, k in and out of range
            rows = _rows(src)
            k = src.byte() % (rows.shape[1] + 2)
            _same(_native.topk_rows, py_topk_rows, rows, k)
        assert (len(c), c.node_count) == (len(py), py.node_count)
        assert c.node_count <= max_nodes
    return n_ops


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
