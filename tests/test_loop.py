"""The decode loop against a scripted fake target whose KV cache is simulated cell by cell.

The fake mirrors what llama.cpp does with a batch: every token becomes a KV cell tagged with
its sequence ids, and a token attends to the cells that carry its FIRST id at positions up to
its own. The fake refuses (AssertionError) any batch llama.cpp would refuse or that would make
a token see a gap or two cells at one position, so any seq-id or position mistake fails loudly.
Its "model" is a deterministic function of the visible tokens, returned as one-hot rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from racer_local.decode import Step, speculate
from racer_local.decode import start as decode_start
from racer_local.drafters.base import Drafter
from racer_local.drafters.pld import PromptLookup
from racer_local.errors import DecodeError
from racer_local.stats import Stats
from racer_local.tree import DraftTree

VOCAB = 32
EOG = 31
PROMPT = [3, 1, 4, 1, 5]


def fib(ctx: list[int]) -> int:
    """The toy model: Fibonacci mod 31 (period 30, so prompt lookup finds repeats); never EOG."""
    return sum(ctx[-2:]) % 31


def eog_after(n: int):
    """fib, except that generated token number n (1-based) is EOG."""

    def model(ctx: list[int]) -> int:
        return EOG if len(ctx) == len(PROMPT) + n - 1 else fib(ctx)

    return model


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding of the toy model: the reference output."""
    ctx, out = list(prompt), []
    while len(out) < n:
        out.append(model(ctx))
        ctx.append(out[-1])
        if out[-1] == EOG:
            break
    return out


def argmax(row: np.ndarray) -> int:
    return int(row.argmax())


@dataclass
class Cell:
    pos: int
    token: int
    seqs: set[int]


def _in(pos: int, p0: int, p1: int) -> bool:
    return (p0 < 0 or pos >= p0) and (p1 < 0 or pos < p1)


@dataclass
class FakeBackend:
    model: object = fib
    n_ctx: int = 256
    n_seq_max: int = 16
    fail_at: int | None = None  # decode call (1-based) that raises DecodeError after writing cells
    cells: list[Cell] = field(default_factory=list)
    calls: int = 0
    call_s: float = 0.0  # the last decode's time, as the real backend reports its llama_decode call
    read_s: float = 0.0

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def pos_max(self, seq: int) -> int:
        return max((c.pos for c in self.cells if seq in c.seqs), default=-1)

    def pos_min(self, seq: int) -> int:
        return min((c.pos for c in self.cells if seq in c.seqs), default=-1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        for c in self.cells:
            if src in c.seqs and _in(c.pos, p0, p1):
                c.seqs.add(dst)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        for c in self.cells:
            if _in(c.pos, p0, p1):
                c.seqs.discard(seq)
        self.cells = [c for c in self.cells if c.seqs]

    def decode(self, tokens, positions, seq_ids=None) -> np.ndarray:
        start = time.perf_counter()
        self.calls += 1
        tokens, positions = list(tokens), list(positions)
        seq_ids = [(0,)] * len(tokens) if seq_ids is None else [tuple(ids) for ids in seq_ids]
        assert len(tokens) == len(positions) == len(seq_ids) > 0
        assert all(ids and all(0 <= s < self.n_seq_max for s in ids) for ids in seq_ids)
        assert len(self.cells) + len(tokens) <= self.n_ctx, "KV cache overflow"
        # llama.cpp's batch checks: per sequence, positions continue the stored ones, are
        # continuous and never decrease; sequences sharing a token hold the same stored range.
        for s in {s for ids in seq_ids for s in ids}:
            pos = [p for p, ids in zip(positions, seq_ids, strict=True) if s in ids]
            assert pos == sorted(pos)
            assert self.pos_max(s) < 0 or pos[0] == self.pos_max(s) + 1, f"seq {s} not continued"
            assert pos[-1] - pos[0] + 1 == len(set(pos)), f"seq {s} positions not continuous"
        for ids in seq_ids:
            ranges = {(self.pos_min(s), self.pos_max(s)) for s in ids}
            assert len(ranges) == 1, f"coupled sequences {ids} have diverged"
        new = [Cell(p, t, set(ids)) for t, p, ids in zip(tokens, positions, seq_ids, strict=True)]
        self.cells += new
        if self.calls == self.fail_at:
            raise DecodeError("scripted failure")
        rows = np.full((len(tokens), VOCAB), -1.0, dtype=np.float32)
        for i, (cell, ids) in enumerate(zip(new, seq_ids, strict=True)):
            seen = sorted(
                (c.pos, c.token) for c in self.cells if ids[0] in c.seqs and c.pos <= cell.pos
            )
            assert [p for p, _ in seen] == list(range(cell.pos + 1)), f"token {i} sees {seen}"
            assert seen[-1][1] == cell.token
            rows[i, self.model([t for _, t in seen])] = 1.0
        self.call_s = time.perf_counter() - start
        return rows

    def committed(self) -> list[int]:
        """The tokens of sequence 0, after checking the cache holds nothing else."""
        assert all(c.seqs == {0} for c in self.cells), "path ids left in the KV cache"
        cells = sorted((c.pos, c.token) for c in self.cells)
        assert [p for p, _ in cells] == list(range(len(cells)))
        return [t for _, t in cells]


class Oracle(Drafter):
    """Knows the toy model: proposes its next `depth` tokens, as a chain or as a tree in which
    every level also holds a wrong sibling (listed first, so it takes the lower path ids)."""

    def __init__(self, model, depth: int = 4, *, branching: bool = False, right: int | None = None):
        self.model, self.depth, self.branching = model, depth, branching
        self.right = depth if right is None else right  # tokens right before the draft goes wrong

    def begin(self, context, rows) -> None:
        self.ctx = list(context)

    def propose(self, root: int, budget: int) -> DraftTree:
        ctx, future = [*self.ctx, root], []
        for k in range(self.depth):
            t = self.model(ctx)
            if k >= self.right:
                t = (t + 1) % VOCAB
            future.append(t)
            ctx.append(t)
        if not self.branching:
            return DraftTree.chain(root, future[: budget - 1])
        wrong = [[*future[:k], (future[k] + 1) % VOCAB] for k in range(self.depth)]
        return DraftTree.build(root, [*wrong, future], max_nodes=budget)

    def observe(self, tree, rows, path) -> None:
        self.ctx += [tree.tokens[i] for i in path]


class Garbage(Drafter):
    """A wide, deep random tree, ignoring the budget (the loop must trim it)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def propose(self, root: int, budget: int) -> DraftTree:
        paths = self.rng.integers(0, VOCAB, size=(12, 6)).tolist()
        return DraftTree.build(root, paths)


def start(fake: FakeBackend, drafter: Drafter, prompt=PROMPT):
    """Prefill the prompt into sequence 0 and return the loop's arguments after it."""
    rows = fake.decode(prompt, range(len(prompt)))
    return decode_start(drafter, argmax, prompt, rows), len(prompt)


def run(fake: FakeBackend, drafter: Drafter, max_tokens: int) -> list[Step]:
    root, n_past = start(fake, drafter)
    return list(speculate(fake, drafter, argmax, root, n_past, max_tokens))


def output(steps: list[Step]) -> list[int]:
    return [t for s in steps for t in s.tokens]


DRAFTERS = {
    "ar": lambda: Drafter(),
    "pld": lambda: PromptLookup(),
    "oracle-chain": lambda: Oracle(fib),
    "oracle-tree": lambda: Oracle(fib, branching=True),
    "half-right-chain": lambda: Oracle(fib, depth=5, right=2),
    "half-right-tree": lambda: Oracle(fib, depth=5, branching=True, right=2),
    "garbage": lambda: Garbage(),
}


# ----- speculative greedy == plain greedy --------------------------------------------------------


@pytest.mark.parametrize("method", DRAFTERS)
def test_output_equals_plain_greedy_and_the_cache_holds_it(method):
    fake = FakeBackend()
    steps = run(fake, DRAFTERS[method](), 80)
    assert output(steps) == greedy(fib, PROMPT, 80)
    assert fake.committed() == PROMPT + output(steps)
    assert not any(s.eog for s in steps)


@pytest.mark.parametrize("method", DRAFTERS)
@pytest.mark.parametrize("max_tokens", [1, 2, 7, 13])
def test_max_tokens_is_respected_exactly(method, max_tokens):
    fake = FakeBackend()
    steps = run(fake, DRAFTERS[method](), max_tokens)
    assert output(steps) == greedy(fib, PROMPT, max_tokens)
    assert fake.committed() == PROMPT + output(steps)


def test_plain_decoding_commits_one_token_per_step():
    steps = run(FakeBackend(), Drafter(), 10)
    assert [len(s.tokens) for s in steps] == [1] * 10
    assert all(s.drafted == 0 for s in steps)


def test_a_step_says_where_its_time_went():
    """The host breakdown: drafting, batch building, llama_decode, reading rows and the walk are
    timed apart, never more than the step took, and Stats adds them up (host share is what is
    not llama_decode)."""
    fake, drafter = FakeBackend(), PromptLookup()
    root, n_past = start(fake, drafter)
    stats, t = Stats(), time.perf_counter()
    for step in speculate(fake, drafter, argmax, root, n_past, 40):
        assert step.draft_s >= 0 and step.build_s > 0 and step.verify_s > 0 and step.walk_s > 0
        assert step.read_s == 0  # the fake's rows need no fetching
        stats.add(step)
    stats.decode_s = time.perf_counter() - t
    parts = stats.draft_s + stats.build_s + stats.verify_s + stats.read_s + stats.walk_s
    assert stats.steps > 0 and stats.build_s > 0 and parts <= stats.decode_s
    assert 0 < stats.host_share < 1
    assert Stats(decode_s=1.0).host_share is None  # not measured (a peer's own timings)


def test_prompt_lookup_gets_drafts_accepted_once_the_sequence_repeats():
    steps = run(FakeBackend(), PromptLookup(), 80)
    assert sum(len(s.tokens) - 1 for s in steps) > 0
    assert len(output(steps)) / len(steps) > 1


@pytest.mark.parametrize("branching", [False, True])
def test_the_oracle_gets_everything_accepted(branching):
    depth, n = 4, 42
    steps = run(FakeBackend(), Oracle(fib, depth, branching=branching), n)
    assert output(steps) == greedy(fib, PROMPT, n)
    # each pass commits the root and all `depth` drafts; the last is cut to what is left
    assert len(steps) == math.ceil(n / (depth + 1))
    assert [len(s.tokens) for s in steps] == [depth + 1] * (n // (depth + 1)) + [n % (depth + 1)]
    assert len(output(steps)) / len(steps) > 1
    full = 2 * depth if branching else depth  # a wrong sibling per level in the tree
    assert [s.drafted for s in steps[:-1]] == [full] * (len(steps) - 1)


def test_wrong_drafts_are_all_rejected():
    steps = run(FakeBackend(), Oracle(fib, right=0, branching=True), 20)
    assert output(steps) == greedy(fib, PROMPT, 20)
    assert [len(s.tokens) for s in steps] == [1] * 20


@pytest.mark.parametrize("method", ["half-right-chain", "half-right-tree"])
def test_a_partially_right_draft_gets_exactly_the_right_part_accepted(method):
    steps = run(FakeBackend(), DRAFTERS[method](), 30)
    assert [len(s.tokens) for s in steps] == [3] * 10  # root + the 2 right drafts


def test_the_context_filling_up_ends_generation_cleanly():
    for method, make in DRAFTERS.items():
        fake = FakeBackend(n_ctx=len(PROMPT) + 10)
        steps = run(fake, make(), 50)
        assert output(steps) == greedy(fib, PROMPT, 10), method
        assert fake.committed() == PROMPT + output(steps)


# ----- end of generation -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ar", "oracle-chain", "oracle-tree"])
@pytest.mark.parametrize("at", [1, 3, 8, 10])
def test_generation_stops_at_eog(method, at):
    model = eog_after(at)
    drafter = {"ar": Drafter(), "oracle-chain": Oracle(model),
               "oracle-tree": Oracle(model, branching=True)}[method]
    fake = FakeBackend(model=model)
    steps = run(fake, drafter, 50)
    out = output(steps)
    assert out == greedy(model, PROMPT, 50)
    assert len(out) == at and out[-1] == EOG  # EOG is part of the last step's tokens
    assert steps[-1].eog and not any(s.eog for s in steps[:-1])
    assert fake.committed() == PROMPT + out


def test_the_oracle_drafting_past_eog_is_cut_at_eog():
    model = eog_after(8)  # the oracle drafts through EOG: steps of 5 would commit 10
    steps = run(FakeBackend(model=model), Oracle(model), 50)
    assert [len(s.tokens) for s in steps] == [5, 3]
    assert steps[-1].tokens[-1] == EOG


# ----- the KV cache after the loop ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["ar", "oracle-chain", "half-right-chain", "half-right-tree"])
def test_a_consumer_stopping_early_leaves_only_the_committed_prefix(method):
    fake = FakeBackend()
    drafter = DRAFTERS[method]()
    root, n_past = start(fake, drafter)
    steps = speculate(fake, drafter, argmax, root, n_past, 100)
    got = [next(steps), next(steps)]
    steps.close()
    assert fake.committed() == PROMPT + output(got)


@pytest.mark.parametrize("method", ["ar", "oracle-chain", "half-right-chain", "half-right-tree"])
@pytest.mark.parametrize("fail_at", [2, 4])  # call 1 is the prefill
def test_an_error_inside_decode_leaves_only_the_committed_prefix(method, fail_at):
    fake = FakeBackend(fail_at=fail_at)
    drafter = DRAFTERS[method]()
    root, n_past = start(fake, drafter)
    got = []
    with pytest.raises(DecodeError, match="scripted"):
        for step in speculate(fake, drafter, argmax, root, n_past, 100):
            got.append(step)
    assert len(got) == fail_at - 2
    assert fake.committed() == PROMPT + output(got)
    assert output(got) == greedy(fib, PROMPT, len(output(got)))
