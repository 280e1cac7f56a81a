"""Greedy speculative output is the model's own greedy output (real model).

Checked as ../shared/notes/llama-cpp.md prescribes, for every drafting method:
(a) every committed token is the argmax of the logits row that verified it (the prompt's last
    row for the first token, else its parent node's row in the same verification batch);
(b) where the output first differs from plain `ar` decoding, plain decoding's top-2 logit
    margin at that position is small. Batched and one-token decoding use different CPU
    kernels, so a near-tie can flip through no fault of the drafts.
NEAR_TIE was measured, not guessed: teacher-forcing the plain greedy outputs of 12 Spec-Bench
prompts back in chunks of 4, 8 and 16 tokens flipped the argmax at 49 of 3,456 positions, and
the largest plain top-2 margin at a flip was 0.44 logits. A flip at a margin above 1.0 means a
real bug (a wrong mask, a stale KV cell, a wrong position).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import racer_local.decode as decode
from racer_local import output_layer, topk

NEAR_TIE = 1.0
METHODS = ["pld", "racer", "racer-retrieval", "racer-logits", "racer-copy"]
BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def _chat(text: str) -> str:
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def _prompts() -> list[str]:
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "one two three four five one two three four five one two",
        # after "three four" came five, six and seven: siblings for the tree to branch on
        "one two three four five, one two three four six, one two three four seven, one two three four",
    ]
    if not BENCH.is_dir():  # the built-in prompts still run; the bench's add long contexts
        return prompts
    spec = [json.loads(line) for line in (BENCH / "specbench.jsonl").read_text().splitlines()]
    for category in ("summarization", "rag", "translation"):
        prompts.append(_chat(next(q for q in spec if q["category"] == category)["turns"][0]))
    human = json.loads((BENCH / "humaneval.jsonl").read_text().splitlines()[0])
    prompts.append(_chat("Implement the following code.\n" + human["prompt"]))
    mgsm = (BENCH / "mgsm_zh.tsv").read_text().splitlines()[0].split("\t")[0]
    prompts.append(_chat(mgsm))
    return prompts


def _record(engine, monkeypatch, prompt, method, max_tokens=48, **options):
    """Generate greedily while recording each verifying row's argmax and top-2 margin."""
    first: list[tuple[int, float]] = []
    walks: list[tuple] = []
    real_prefill, real_walk = engine.backend.prefill, decode.walk

    def prefill(*args, **kwargs):
        rows = real_prefill(*args, **kwargs)
        first.append((topk.best(rows[-1]), topk.margin(rows[-1])))
        return rows

    def walk(tree, rows, choose):
        b = engine.backend  # top-k rows: llama.cpp's graph took them, or racer-local's layer kept them
        kept = b.native_top_k > 0 and b.output_layer == "native" and len(tree) >= output_layer.MIN_ROWS
        assert isinstance(rows, topk.TopK) == (b.top_k > 0 or kept)
        path, nxt = real_walk(tree, rows, choose)
        nodes = [rows[i] for i in range(len(tree))]
        walks.append((tree, [topk.best(r) for r in nodes], [topk.margin(r) for r in nodes], path, nxt))
        return path, nxt

    monkeypatch.setattr(engine.backend, "prefill", prefill)
    monkeypatch.setattr(decode, "walk", walk)
    engine.reset()
    out = engine.generate(prompt, max_tokens=max_tokens, method=method, **options)
    monkeypatch.undo()
    return out.tokens, first[0], walks


def _check_every_token_is_the_argmax(tokens, first, walks):
    """(a): rebuild the output from the recorded rows alone; return each token's margin."""
    expected, margins = first[0], [first[1]]
    rebuilt = []
    for tree, argmax, row_margins, path, nxt in walks:
        assert tree.tokens[path[0]] == expected, "the root is not the previous step's argmax"
        for parent, child in zip(path, path[1:]):
            assert tree.tokens[child] == argmax[parent], "accepted a token the target did not choose"
        rebuilt += [tree.tokens[i] for i in path]
        margins += [row_margins[i] for i in path]
        assert nxt == argmax[path[-1]], "the bonus token is not the argmax of the last accepted row"
        expected = nxt
    assert tokens == rebuilt[: len(tokens)]
    return margins


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(params=["native", "host", "backend"])
def rows_from(engine, request):
    """The engine reading rows computed by racer-local's output layer (native: each row's best k,
    kept by its kernel, for batches; full rows from llama.cpp for one row), full rows from
    llama.cpp's (host), then each node's top-k from llama.cpp's graph (the GPU path, forced here
    on the CPU)."""
    backend, was = engine.backend, engine.backend.output_layer
    if request.param == "native" and not backend.native_output_loaded:
        pytest.skip(f"racer-local's output layer cannot serve here: {backend.output_layer_why}")
    backend.use_native_output(request.param == "native")
    engine.candidates = "backend" if request.param == "backend" else "host"
    yield request.param
    engine.candidates = "auto"
    backend.use_native_output(was == "native")


def test_speculative_greedy_equals_plain_greedy(engine, rows_from, monkeypatch, prompts, record_property):
    branched = 0
    for prompt in prompts:
        plain, first, walks = _record(engine, monkeypatch, prompt, "ar")
        plain_margins = _check_every_token_is_the_argmax(plain, first, walks)
        for method in METHODS:
            tokens, first, walks = _record(engine, monkeypatch, prompt, method)
            _check_every_token_is_the_argmax(tokens, first, walks)
            branched += sum(1 for tree, *_ in walks if tree.n_leaves > 1)
            diverged = next((i for i, (a, b) in enumerate(zip(plain, tokens)) if a != b), None)
            if diverged is None:
                assert len(tokens) == len(plain), f"{method}: stopped at a different length"
                continue
            margin = plain_margins[diverged]
            record_property(f"{method} divergence ({rows_from} rows)",
                            f"token {diverged}, ar top-2 margin {margin:.3f}")
            assert margin < NEAR_TIE, (
                f"{method} diverged from plain greedy at token {diverged} where plain decoding's "
                f"top-2 margin is {margin:.3f} (> {NEAR_TIE}): not a near-tie, a real bug"
            )
    assert branched > 0, "no verified tree had branches: the tree path was not exercised"


@pytest.mark.parametrize("method", ["pld", "racer"])
def test_a_predicted_output_makes_drafts_not_output(engine, monkeypatch, method):
    """OpenAI's predicted outputs: given the text the answer will repeat (here plain decoding's
    own, which the prompt does not hold), drafts copy it and far fewer steps are taken, and every
    token is still the target's argmax."""
    prompt = "The capital of France is"
    plain, first, walks = _record(engine, monkeypatch, prompt, "ar")
    margins = _check_every_token_is_the_argmax(plain, first, walks)
    _, _, walks_alone = _record(engine, monkeypatch, prompt, method)
    tokens, first, walks = _record(engine, monkeypatch, prompt, method, prediction=plain)
    _check_every_token_is_the_argmax(tokens, first, walks)
    diverged = next((i for i, (a, b) in enumerate(zip(plain, tokens)) if a != b), None)
    assert diverged is None or margins[diverged] < NEAR_TIE
    assert len(walks) <= len(walks_alone) / 2, (len(walks), len(walks_alone))


def test_top_k_on_the_backend_gives_the_host_paths_greedy_output(engine, prompts):
    """Plain decoding has the same batch shapes either way, so the same logits: the tokens
    must be identical, not just near-tie close."""
    outputs = {}
    for where in ("host", "backend"):
        engine.candidates = where
        try:
            outputs[where] = [engine.generate(p, max_tokens=32, method="ar").tokens for p in prompts]
        finally:
            engine.candidates = "auto"
    assert outputs["backend"] == outputs["host"]
