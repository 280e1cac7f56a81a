"""Bounded differential fuzzing of the C n-gram index and top-k against the Python twin.

The harness is tests/fuzz/fuzz_ngram.py (an atheris target when run as a script). Here it
replays the kept corpus tests/fuzz_corpus/ (inputs the fuzzer found interesting or that once
broke something), runs a seeded loop of random inputs for a few seconds, and, when atheris is
installed, a short coverage-guided run in a subprocess.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("racer_local._native", reason="racer_local._native is not built")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fuzz"))
from fuzz_ngram import check  # noqa: E402

CORPUS = HERE / "fuzz_corpus"
SEEDED_SECONDS = float(os.environ.get("RACER_FUZZ_SECONDS", "4"))


def test_corpus_inputs_agree():
    paths = sorted(CORPUS.iterdir())
    assert paths, f"the fuzz corpus {CORPUS} is empty"
    for path in paths:
        try:
            check(path.read_bytes())
        except AssertionError as exc:
            raise AssertionError(f"corpus input {path.name}: {exc}") from exc


def test_hand_picked_edge_cases_agree():
    # window 1, tiny cap, tokens at 2**31-1, huge budgets, bad tokens, top-k with NaN rows
    cases = [
        bytes([0, 0, 0, 1]) + bytes([0, 20] + [255] * 20) * 6 + bytes([10, 0, 0]) * 3,
        bytes([5, 3, 0, 0]) + bytes([1, 23] + [i % 3 for i in range(23)]) * 20 + bytes([8, 1, 47]) * 5,
        bytes([6, 9, 1, 3]) + bytes([12, 0, 1, 2, 3, 13, 0, 13, 1, 13, 2, 11]),
        bytes([2, 1, 250, 2]) + bytes([15, 2, 11, *range(1, 255, 7)]) * 4,
    ]
    for data in cases:
        assert check(data) > 0


def test_seeded_random_inputs_agree(tmp_path):
    rng = random.Random(20261122)
    deadline, runs = time.monotonic() + SEEDED_SECONDS, 0
    while time.monotonic() < deadline or runs < 200:
        data = rng.randbytes(rng.randrange(1, 800))
        try:
            check(data)
        except AssertionError as exc:
            kept = tmp_path / f"seeded-{runs}"
            kept.write_bytes(data)
            raise AssertionError(f"{exc}; input kept at {kept}: copy it into {CORPUS} with the fix") from exc
        runs += 1


def test_short_coverage_guided_run(tmp_path):
    pytest.importorskip("atheris")
    work = tmp_path / "corpus"
    work.mkdir()
    # -rss_limit_mb=0: libFuzzer reads the peak RSS, which Linux carries across exec from this
    # pytest process (2.4 GB once earlier tests have loaded models), so its 2 GB limit would
    # stop the run before its first input.
    cmd = [sys.executable, str(HERE / "fuzz" / "fuzz_ngram.py"), "-max_total_time=5", "-max_len=1024",
           "-rss_limit_mb=0", f"-artifact_prefix={tmp_path}/crash-", str(work), str(CORPUS)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*")), "atheris found a disagreement; see the artifact"
