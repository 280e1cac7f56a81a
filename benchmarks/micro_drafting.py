"""Micro benchmark of the drafting work done every decode step, Python twin against C.

One step = extend the index by 3 tokens + retrieve(budget 16) + topk_rows over 8 rows of
262,144 logits (k 8), at 1k and 8k tokens of context. Streams are text-like: Zipf-distributed
words with copied phrases. Methods are warmed up and interleaved; medians are reported.
Leaves out: llama.cpp, the tree build and verification (see the real benchmark for those).

    python benchmarks/micro_drafting.py [--steps 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import racer_local.ngram as ngram
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import racer_local.ngram as ngram

VOCAB, ROWS, TOPK, BUDGET, TOKENS_PER_STEP = 262_144, 8, 8, 16, 3
ROW = "{:>7} {:>6} {:>10} {:>12} {:>9} {:>9}"


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def text_like_stream(rng: np.random.Generator, n: int) -> list[int]:
    """Zipf-ish words with ~30% copied phrases, like prose or code that repeats itself."""
    words = rng.choice(VOCAB, size=5000, replace=False)
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    out: list[int] = []
    while len(out) < n:
        if out and rng.random() < 0.3:
            start = int(rng.integers(0, len(out)))
            out.extend(out[start : start + int(rng.integers(3, 20))])
        else:
            out.extend(int(t) for t in rng.choice(words, size=int(rng.integers(1, 10)), p=probs))
    return out[:n]


def run_steps(index_cls, topk, stream, context, logits, steps):
    """Seconds spent per step in (extend, retrieve, topk), summed over `steps` steps."""
    index = index_cls()
    index.extend(stream[:context])
    spent = [0.0, 0.0, 0.0]
    pos = context
    for _ in range(steps):
        t0 = time.perf_counter()
        index.extend(stream[pos : pos + TOKENS_PER_STEP])
        pos += TOKENS_PER_STEP
        t1 = time.perf_counter()
        index.retrieve(stream[pos], BUDGET)
        t2 = time.perf_counter()
        topk(logits, TOPK)
        t3 = time.perf_counter()
        spent[0] += t1 - t0
        spent[1] += t2 - t1
        spent[2] += t3 - t2
    return [s / steps for s in spent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    args = parser.parse_args()

    methods = {"python": (ngram.PyNgramIndex, ngram.py_topk_rows)}
    try:
        from racer_local import _native

        methods["c"] = (_native.NgramIndex, _native.topk_rows)
    except ImportError as exc:
        print(f"C extension not built ({exc}); timing Python only", file=sys.stderr)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((ROWS, VOCAB)).astype(np.float32)
    print(f"python {platform.python_version()}, numpy {np.__version__}, {cpu_name()}")
    print(
        f"step = extend {TOKENS_PER_STEP} + retrieve(budget {BUDGET}) + topk_rows({ROWS}x{VOCAB}, "
        f"k={TOPK}); median of {args.rounds} rounds x {args.steps} steps\n"
    )
    print(ROW.format("context", "impl", "extend ms", "retrieve ms", "topk ms", "step ms"))

    for context in (1024, 8192):
        stream = text_like_stream(rng, context + TOKENS_PER_STEP * args.steps + 1)
        for index_cls, topk in methods.values():  # warm up
            run_steps(index_cls, topk, stream, context, logits, 3)
        samples: dict[str, list[list[float]]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, (index_cls, topk) in methods.items():
                per_step = run_steps(index_cls, topk, stream, context, logits, args.steps)
                samples[name].append(per_step)
        totals = {}
        for name, rounds in samples.items():
            parts = [statistics.median(r[i] for r in rounds) * 1e3 for i in range(3)]
            totals[name] = statistics.median(sum(r) for r in rounds) * 1e3
            print(ROW.format(context, name, *(f"{ms:.3f}" for ms in (*parts, totals[name]))))
        if "c" in totals:
            print(ROW.format(context, "py/c", "", "", "", f"{totals['python'] / totals['c']:.1f}x"))


if __name__ == "__main__":
    main()
