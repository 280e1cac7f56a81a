"""Drafters replayed on `ar`'s own text, priced by this machine's cost curve: seconds, not a bench.

For each bench prompt (suite all, bench order) it decodes `ar`'s greedy text once and takes the
target's top-k after every position of it (one batched prefill; cached in --cache). Then each
method drafts along that text as it would in the decode loop: a draft node is accepted when its
path is the text, the copy-logit table learns the rows of the accepted nodes (a rejected node's
row, the target after a wrong token, is not known here and is left out), and every step is priced
t(N)/t(1) by the measured curve at its context. No forward pass per step and no timing noise, so
a change to the drafting side can be judged on both models in a minute; the bench's own figures
(its `priced` row) remain the judge, since rejected rows and live curves are left out here.

Deterministic: racer's measured drafting time enters its tree prices, which made two replays of
the same code differ by 3%, so it is pinned (--overhead-ms). `--held-out` replays the prompts of
`--limit 5` that `--limit 2` (the bench's dev set) leaves out: a change tuned on the dev prompts
should hold there too.

    python benchmarks/replay_drafts.py [-m MODEL] [--methods racer,racer-copy,...] [--held-out]
        [--config risk=0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np

try:
    import racer_local  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from racer_local import bench_suites as suites
from racer_local import costmodel, topk
from racer_local.drafters import make_drafter
from racer_local.engine import Engine

K = 8


def texts(engine, prompts, max_tokens: int) -> list[dict]:
    """Per turn: prompt ids, ar's tokens and the top-K after the prompt and after each token."""
    out = []
    for prompt in prompts:
        messages = []
        for text in prompt.turns:
            messages.append(("user", text))
            ids = suites.chat_tokens(engine, messages)
            engine.reset()
            c = engine.generate(ids, max_tokens=max_tokens, method="ar")
            engine.reset()
            rows = engine.backend.prefill([*ids, *c.tokens[:-1]], 0, n_logits=len(c.tokens))
            ids_k, logits_k = topk.top(rows, K)
            engine.reset()
            out.append({"id": prompt.id, "category": prompt.category, "prompt": ids,
                        "tokens": list(c.tokens), "top_ids": ids_k.copy(), "top_logits": logits_k.copy()})
            messages.append(("assistant", suites.reply_text(engine, c.text)))
    return out


class StaticCost:
    """The measured curve at the present context, never refined (no observe: no timing here)."""

    def __init__(self, curve) -> None:
        self.curve, self.sizes, self.context = curve, curve.sizes, None

    def at(self, context: int) -> None:
        self.context = context

    def time(self, n: int) -> float:
        return self.curve.time(n, self.context)

    def relative(self, n: int, context: int) -> float:
        return self.curve.time(n, context) / self.curve.time(1, context)


def replay(drafter, turn: dict, cost: StaticCost, overhead: float) -> tuple[float, int, float]:
    """(sum of t(N)/t(1) over the steps, steps, seconds in begin, propose and observe) of one
    turn."""
    text, prompt = turn["tokens"], turn["prompt"]
    rows = topk.TopK(turn["top_ids"], turn["top_logits"])
    clock = time.perf_counter
    spent = clock()
    drafter.begin(prompt, rows[:1])
    spent = clock() - spent
    pinned = hasattr(drafter, "_overhead")
    table = getattr(drafter, "table", None)
    if table is not None:  # only the accepted nodes' rows are known: see the module docstring
        real = table.update
        keep: list[bool] = []

        def table_update(tokens, tree_rows):
            sel = [i for i, k in enumerate(keep) if k]
            real([tokens[i] for i in sel], tree_rows[sel])

        table.update = table_update  # for this turn only (tables are reused): see the end
    pos, priced, steps = 0, 0.0, 0
    while pos < len(text):
        if pinned:
            drafter._overhead = overhead
        t0 = clock()
        tree = drafter.propose(text[pos], 64).limit(64, len(text) - pos - 1)
        spent += clock() - t0
        path, node = [0], 0
        while pos + len(path) < len(text):
            child = tree.children[node].get(text[pos + len(path)])
            if child is None:
                break
            path.append(child)
            node = child
        depth = {n: d for d, n in enumerate(path)}
        tree_rows = topk.TopK(np.zeros((len(tree), K), np.int32), np.zeros((len(tree), K), np.float32))
        for n, d in depth.items():  # the row after text[pos + d]; the text's last has none
            at = min(pos + d + 1, len(rows) - 1)
            tree_rows.ids[n], tree_rows.logits[n] = rows.ids[at], rows.logits[at]
        if table is not None:
            keep[:] = [i in depth for i in range(len(tree))]
        t0 = clock()
        drafter.observe(tree, tree_rows, path)
        spent += clock() - t0
        priced += cost.relative(len(tree), len(prompt) + pos)
        steps += 1
        pos += len(path)
    if table is not None:
        del table.update
    return priced, steps, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model")
    parser.add_argument("--methods", default="pld,racer,racer-retrieval,racer-logits,racer-copy")
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--held-out", action="store_true",
                        help="the prompts of --limit 5 that --limit 2 leaves out, not --limit's")
    parser.add_argument("--overhead-ms", type=float, default=0.5,
                        help="racer's drafting time per step, pinned (see the module docstring)")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="a RacerConfig field for racer's drafters, e.g. pay_margin=1.1 (repeatable)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "racer-local" / "replay"))
    args = parser.parse_args()

    engine = Engine(args.model, threads=args.threads, n_ctx=4096)
    path = engine.model_path
    split = "held-out" if args.held_out else f"limit{args.limit}"
    cache = Path(args.cache) / f"{path.stem}-{split}-{args.max_tokens}.pkl"
    if cache.exists():  # the texts and the curve of the first replay: A/Bs compare like with like
        turns, curve = pickle.loads(cache.read_bytes())
    else:
        curve = costmodel.cached(engine.backend)  # first, while this process has not loaded the cores
        data = suites.find_data_dir(None)
        prompts = suites.load("all", data, 5 if args.held_out else args.limit)
        if args.held_out:
            dev = {p.id for p in suites.load("all", data, 2)}
            prompts = [p for p in prompts if p.id not in dev]
        turns = texts(engine, prompts, args.max_tokens)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps((turns, curve)))
    cost = StaticCost(curve)
    methods = args.methods.split(",")
    overrides = {k: float(v) for k, v in (c.split("=", 1) for c in args.config)}
    per: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for method in methods:
        for turn in turns:
            drafter = make_drafter(method, engine.backend)
            if hasattr(drafter, "cost"):
                drafter.cost = cost
            if hasattr(drafter, "config") and overrides:
                drafter.config = dataclasses.replace(drafter.config, **overrides)
            priced, steps, spent = replay(drafter, turn, cost, args.overhead_ms / 1e3)
            got = per[method].setdefault(turn["category"], [0.0, 0, 0, 0.0])
            got[0] += priced
            got[1] += len(turn["tokens"])
            got[2] += steps
            got[3] += spent
    categories = list(dict.fromkeys(t["category"] for t in turns))
    print(f"{path.name}: priced speedup over ar (tokens / sum t(N)/t(1)), tokens per step")
    print(f"{'category':<16}" + "".join(f"{m:>17}" for m in methods))
    for cat in [*categories, "overall"]:
        cells = []
        for m in methods:
            rows = [v for c, v in per[m].items() if cat in (c, "overall")]
            priced, tokens, steps = (sum(r[i] for r in rows) for i in range(3))
            cells.append(f"{tokens / priced:>9.2f}x {tokens / steps:>5.2f}")
        print(f"{cat:<16}" + "".join(f"{c:>17}" for c in cells))
    drafting = [sum(v[3] for v in per[m].values()) * 1e3 / sum(v[2] for v in per[m].values())
                for m in methods]
    print(f"{'drafting ms/step':<16}" + "".join(f"{d:>17.3f}" for d in drafting))


if __name__ == "__main__":
    main()
