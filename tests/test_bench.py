"""`racer-local bench` reports honest numbers.

Pure tests (prompt files, chat formatting, labels, totals, greedy agreement) use hand-made
records and files in tmp_path. One real run of the command on the embedded model (two MGSM
prompts, a few methods, 24 tokens) checks the written files: speedup is the ratio of the
measured tokens/s, `ar` against itself is about 1.0, and a failing method is reported.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from click.testing import CliRunner

from racer_local import bench, bench_methods, bench_report, bench_suites
from racer_local.cli import main
from racer_local.decode import Step
from racer_local.drafters import DRAFTERS
from racer_local.drafters.base import Drafter
from racer_local.stats import Stats

# ----- prompts and formatting ---------------------------------------------------------------


def test_prompts_are_what_engine_chat_sends(engine):
    """The engine's chat format, whichever it picks for this model, and exactly one BOS."""
    messages = [("user", "hi"), ("assistant", "hello"), ("user", "bye")]
    ids = bench_suites.chat_tokens(engine, messages)
    engine.reset()
    reply = engine.chat([{"role": r, "content": t} for r, t in messages], max_tokens=1, method="ar")
    engine.reset()
    assert reply.stats.prompt_tokens == len(ids) and ids.count(engine.backend.bos) == 1
    text = engine.backend.detokenize(ids)
    assert text.index("hi") < text.index("hello") < text.index("bye")
    for stop in engine.chat_format.stop:  # an answer that runs on into a made-up next turn
        assert bench_suites.reply_text(engine, f"Paris.{stop} And") == "Paris."


def test_suites_read_the_published_file_names_and_formats(tmp_path):
    with (tmp_path / "question.jsonl").open("w") as f:
        for i, cat in enumerate(["writing", "coding", "qa", "qa", "qa"]):
            turns = [f"q{i}"] * (1 if cat == "qa" else 2)
            f.write(json.dumps({"question_id": i, "category": cat, "turns": turns}) + "\n")
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    (tmp_path / "mgsm_zh.tsv").write_text("问题一\t1\n问题二\t2\n")
    prompts = bench_suites.load("all", tmp_path)
    assert [(p.id, p.category, len(p.turns)) for p in prompts] == [
        ("specbench/0", "multi-turn", 2), ("specbench/1", "multi-turn", 2),
        ("specbench/2", "qa", 1), ("specbench/3", "qa", 1), ("specbench/4", "qa", 1),
        ("humaneval/HumanEval/0", "humaneval", 1), ("mgsm-zh/0", "mgsm-zh", 1),
        ("mgsm-zh/1", "mgsm-zh", 1)]
    assert prompts[5].turns == ("Implement the following code.\ndef f():\n",)
    spread = bench_suites.load("specbench", tmp_path, limit=2)  # evenly spaced per category
    assert [p.id for p in spread] == ["specbench/0", "specbench/1", "specbench/2", "specbench/3"]


def test_a_missing_data_dir_says_where_to_get_the_files(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    for where in (str(tmp_path / "nope"), "hemingkx/Spec-Bench", "openai/human-eval", "url-nlp"):
        assert where in line


def test_labels_put_ar_first_and_number_repeats():
    assert bench_methods.labels_for(["pld", "ar", "ar"]) == [("ar", "ar"), ("pld", "pld"), ("ar#2", "ar")]
    assert bench_methods.labels_for(["racer"]) == [("ar", "ar"), ("racer", "racer")]


# ----- metrics from hand-made records ------------------------------------------------------


def run(tokens, decode_s, prefill_s=1.0, steps=None, error=None, finish="length"):
    stats = Stats(generated_tokens=tokens, decode_s=decode_s, prefill_s=prefill_s,
                  steps=steps or tokens)
    return bench.Run([bench.Turn(stats, list(range(tokens)), "", finish, [])], error=error)


def test_totals_not_means_of_ratios_over_prompts_both_finished():
    base = [run(10, 1.0), run(30, 1.0), run(5, 1.0), run(5, 1.0, error="X")]
    mine = [run(10, 0.5), run(30, 2.0), run(5, 1.0, error="RuntimeError: boom"), run(5, 0.1)]
    m = bench.metrics(list(zip(mine, base, strict=True)))
    assert (m["prompts"], m["failed"], m["baseline_failed"]) == (2, 1, 1)
    assert m["tokens_per_s"] == pytest.approx(40 / 2.5)
    assert m["baseline_tokens_per_s"] == pytest.approx(40 / 2.0)
    assert m["speedup"] == pytest.approx((40 / 2.5) / (40 / 2.0))  # a mean of ratios: 1.25
    assert m["e2e_speedup"] == pytest.approx((40 / 4.5) / (40 / 4.0))


def test_greedy_agreement_and_the_margin_at_divergence():
    """The margin is the baseline's own where the texts part: its prompt prefilled, then its
    tokens decoded one a step, as it decoded them (never a batched prefill of the whole text)."""
    def row(gap):
        out = np.zeros((1, 8), dtype=np.float32)
        out[0, 1], out[0, 2] = 5.0, 5.0 - gap
        return out

    class FakeEngine:
        class backend:
            decoded: list[tuple[list, list]] = []

            @staticmethod
            def prefill(context, start, n_logits):
                assert (context, start, n_logits) == ([7], 0, 1)
                return row(5.0)

            @classmethod
            def decode(cls, tokens, positions):
                cls.decoded.append((list(tokens), list(positions)))
                return row(0.5 if positions == [1] else 5.0)  # a near-tie before the 2nd token

        def reset(self):
            pass

    def tokens(*ids):
        return bench.Run([bench.Turn(Stats(), list(ids), "", "length", [7])])

    runs = {"ar": tokens(1, 2, 3), "same": tokens(1, 2, 3), "tie": tokens(1, 9, 3),
            "far": tokens(1, 2, 9), "failed": bench.Run(error="E")}
    bench.compare_greedy(FakeEngine(), runs)
    agreement = [runs[k].agreement for k in runs]
    assert agreement == ["identical", "identical", "near-tie", "diverged", None]
    assert (runs["tie"].diverged_at, runs["tie"].margin) == (1, 0.5)
    assert (runs["far"].diverged_at, runs["far"].margin) == (2, 5.0)
    assert FakeEngine.backend.decoded == [([1], [1]), ([2], [2])]  # ar's path, once for both


class Timed:
    """A method whose runs take the given seconds in turn, warm-up first (recorded, not slept);
    None raises."""

    def __init__(self, *seconds) -> None:
        self.seconds = list(seconds)

    def generate(self, ids, max_tokens, sampling):
        s = self.seconds.pop(0)
        if s is None:
            raise RuntimeError("injected failure")
        return bench.Turn(Stats(generated_tokens=1, decode_s=s), [1], "x", "length", ids)

    def close(self):
        pass


class Server(Timed):
    """A method with state across requests (as llama-server keeps): it must start afresh."""

    forgotten = 0

    def forget(self):
        self.forgotten += 1


def test_repeats_keep_each_methods_fastest_run_and_any_failure(engine):
    prompt = bench_suites.Prompt("p", "s", "c", ("hi",))
    methods = {"ar": Timed(9.0, 3.0, 1.0, 2.0), "flaky": Timed(9.0, 1.0, None, 2.0),
               "server": Server(9.0, 2.0, 9.0, 0.5, 9.0, 1.0)}  # warmed up again after each fresh start
    results, _, _ = bench.run_all(engine, methods, [prompt], max_tokens=4, sampling={},
                                  progress=False, repeats=3)
    assert results["p"]["ar"].turns[0].stats.decode_s == 1.0
    assert results["p"]["server"].turns[0].stats.decode_s == 0.5
    assert "injected failure" in results["p"]["flaky"].error
    assert all(m.seconds == [] for m in methods.values())  # three rounds each
    assert methods["server"].forgotten == 2  # no round drafts from an earlier round's answer
    # Each round's decode time is kept, so the report can say how far apart two rounds were.
    assert results["p"]["ar"].rounds == [3.0, 1.0, 2.0]
    ar = results["p"]["ar"]
    assert bench.metrics([(ar, ar)])["spread"] == pytest.approx(2.0)  # 3 s against 1 s
    assert bench.metrics([(bench.Run(ar.turns), ar)])["spread"] is None  # one round: no spread


def test_short_prompts_get_more_rounds_with_min_time(engine):
    short = bench_suites.Prompt("short", "s", "c", ("hi",))
    long = bench_suites.Prompt("long", "s", "c", ("hi",))
    # Warm-ups, then the short prompt's rounds (0.3 s: ceil(1.0 / 0.3) = 4 rounds), then the long
    # one's (2 s: --repeats' 2 rounds).
    methods = {"ar": Timed(9.0, 0.3, 0.2, 0.4, 0.3, 2.0, 2.5),
               "other": Timed(9.0, 0.3, 0.3, 0.1, 0.3, 2.0, 1.5)}
    results, _, _ = bench.run_all(engine, methods, [short, long], max_tokens=4, sampling={},
                                  progress=False, repeats=2, min_time=1.0)
    assert all(m.seconds == [] for m in methods.values())  # every run asked for, no more
    assert results["short"]["ar"].rounds == [0.3, 0.2, 0.4, 0.3]
    assert results["short"]["other"].turns[0].stats.decode_s == 0.1  # the fastest of its four
    assert results["long"]["other"].rounds == [2.0, 1.5]
    # Spread over the rounds both prompts ran: (0.3 + 2.0) against (0.2 + 2.5).
    assert bench.round_spread([results["short"]["ar"], results["long"]["ar"]]) == pytest.approx(2.7 / 2.3 - 1)


def test_rounds_for_caps_short_prompts_and_keeps_repeats():
    assert bench.rounds_for(1, 2.0, [0.01, 0.02]) == bench.defaults.BENCH_MAX_ROUNDS
    assert bench.rounds_for(3, 2.0, [5.0]) == 3
    assert bench.rounds_for(1, 0.0, [0.01]) == 1  # off
    assert bench.rounds_for(2, 2.0, []) == 2  # every method failed: nothing to go by


# ----- one real run on the embedded model ---------------------------------------------------


class Failing(Drafter):
    name = "failing"

    def propose(self, root, budget):
        raise RuntimeError("injected failure")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, model_path):
    if not (bench_suites.Path(__file__).resolve().parents[2] / "shared" / "bench").is_dir():
        pytest.skip("benchmark prompts not found at ../shared/bench")
    out = tmp_path_factory.mktemp("bench")
    # One thread: on this shared 2-core machine a 2-thread llama.cpp next to another busy
    # process spins in its barriers and slows down tens of times, unevenly between methods.
    args = ["bench", "--suite", "mgsm-zh", "--limit", "2", "--max-tokens", "24", "--threads", "1",
            "--n-ctx", "512", "-m", str(model_path), "--out", str(out),
            "--methods", "ar,ar,pld,failing,llama-cpp-python-pld"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DRAFTERS, "failing", lambda backend, **kw: Failing())
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def test_the_three_files_exist_and_parse(bench_run):
    out, data = bench_run
    keys = {"environment", "settings", "cost_curve", "summary", "prompts", "versus_peers"}
    assert keys <= set(data)
    assert len(data["environment"]["model_sha256"]) == 64 and data["environment"]["threads"] == 1
    report = (out / "report.md").read_text()
    assert "| ar#2 |" in report and "| failing |" in report and "Ceiling" in report
    assert "priced by that curve" in report and "pld " in report.split("priced by that curve")[1]
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_runs_bound_each_category_on_ars_text(bench_run):
    out, data = bench_run
    for p in data["prompts"].values():
        ar = p["runs"]["ar"]["turns"]
        assert [len(lengths) for lengths in p["draftable"]] == [len(t["tokens"]) for t in ar]
    report = (out / "report.md").read_text()
    table = report.split("Bound on `ar`'s text")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| category | bound | ar#2 | pld |"  # our methods with steps; not the failing one
    bound = float(table[-1].split(" | ")[1].rstrip("x"))
    assert table[-1].startswith("| **overall** |") and bound >= 1.0


def test_the_cli_repeats_short_prompts_by_default(bench_run):
    out, data = bench_run
    # 24 tokens decode in well under --min-time's default 2 s, so each prompt ran more rounds.
    for p in data["prompts"].values():
        assert len(p["runs"]["ar"]["rounds_decode_s"]) > 1
    assert "got more rounds" in (out / "report.md").read_text()


def test_the_host_breakdown_covers_our_methods_not_opaque_ones(bench_run):
    out, data = bench_run
    summary = data["summary"]
    for label in ("ar", "pld"):
        m = summary[label]["overall"]
        assert 0 < m["host_share"] < 1
        parts = sum(m[part] for part in ("draft_s", "build_s", "verify_s", "read_s", "walk_s"))
        assert 0 < m["verify_s"] and 0 < m["build_s"] and parts <= m["decode_s"]
    assert summary["llama-cpp-python-pld"]["overall"]["host_share"] is None  # its timings are its own
    lines = (out / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | steps |")) + 2
    rows = lines[start : lines.index("", start)]
    assert {row.split(" | ")[0] for row in rows} == {"| ar", "| ar#2", "| pld"}  # failing: no steps timed


def test_speedup_is_the_ratio_of_measured_tokens_per_second(bench_run):
    """Recomputed from the per-prompt records: tokens/s is sum(tokens) / sum(decode seconds),
    and speedup is that over ar's, overall and per category (nothing failed for ar here)."""
    prompts, summary = bench_run[1]["prompts"], bench_run[1]["summary"]

    def group(label, name):
        return summary[label]["overall"] if name is None else summary[label]["categories"][name]

    def measured(label, name):
        stats = [t["stats"] for p in prompts.values() if name in (None, p["category"])
                 if not p["runs"][label]["error"] for t in p["runs"][label]["turns"]]
        return sum(s["generated_tokens"] for s in stats) / sum(s["decode_s"] for s in stats)

    for label in summary:
        for name in [None, *summary[label]["categories"]]:
            m, ar = group(label, name), group("ar", name)
            if m["prompts"] == 0:  # the failing method: no rate to compare
                assert m["speedup"] == 0 and m["failed"] > 0
                continue
            assert m["tokens_per_s"] == pytest.approx(measured(label, name), rel=1e-9)
            assert m["baseline_tokens_per_s"] == pytest.approx(ar["tokens_per_s"], rel=1e-9)
            assert m["speedup"] == pytest.approx(measured(label, name) / measured("ar", name))
            e2e = m["e2e_tokens_per_s"] / ar["e2e_tokens_per_s"]
            assert m["e2e_speedup"] == pytest.approx(e2e, rel=1e-9)


def test_ar_against_itself_is_about_one(bench_run):
    # Loose: the two `ar` runs alternate prompt by prompt, but this 2-core machine is shared
    # with other sessions' jobs, and 2 prompts of 24 tokens (about a second each) leave
    # room for scheduler noise.
    speedup = bench_run[1]["summary"]["ar#2"]["overall"]["speedup"]
    assert 0.7 < speedup < 1.4


def test_failures_are_reported_not_dropped(bench_run):
    out, data = bench_run
    failing = data["summary"]["failing"]["overall"]
    assert (failing["failed"], failing["prompts"], failing["generated_tokens"]) == (2, 0, 0)
    assert data["failures"] >= 2 and "injected failure" in data["warmup_errors"]["failing"]
    for p in data["prompts"].values():
        assert "RuntimeError: injected failure" in p["runs"]["failing"]["error"]
        run = p["runs"]["llama-cpp-python-pld"]  # a peer: succeeds, or says why it did not
        assert run["error"] or run["turns"][0]["stats"]["generated_tokens"] > 0
    report = (out / "report.md").read_text()
    assert "failing` failed on mgsm-zh/0: RuntimeError: injected failure" in report


def test_the_ceiling_comes_from_the_cost_curve(bench_run):
    curve = bench_run[1]["cost_curve"]
    points = zip(curve["sizes"], curve["seconds"], strict=True)
    implied = max(n * curve["seconds"][0] / s for n, s in points)
    assert curve["ceiling"] == pytest.approx(implied, rel=1e-6) and curve["ceiling"] >= 1.0


def test_same_text_pins_our_methods_to_ars_tokens(tmp_path, model_path):
    (tmp_path / "mgsm_zh.tsv").write_text("小明有3个苹果，又买了5个。他现在有几个苹果？\t8\n")
    data = bench.run(model=model_path, threads=1, n_ctx=512, n_gpu_layers=0, suite="mgsm-zh",
                     data_dir=tmp_path, methods=["ar", "racer", "pld"], limit=1, max_tokens=24,
                     sampling={"temperature": 0.0}, out=tmp_path / "out", command="", same_text=True,
                     repeats=2, echo=lambda line: None)
    (runs,) = [p["runs"] for p in data["prompts"].values()]
    tokens = {label: run["turns"][0]["tokens"] for label, run in runs.items()}
    assert tokens["racer"] == tokens["pld"] == tokens["ar"]
    assert data["settings"]["same_text"] and data["settings"]["repeats"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Same text" in report and "2 rounds" in report and "Round spread" in report
    assert len(runs["ar"]["rounds_decode_s"]) == 2
    with pytest.raises(ValueError, match="temperature 0"):
        bench.run(model=model_path, threads=1, n_ctx=512, n_gpu_layers=0, suite="mgsm-zh",
                  data_dir=tmp_path, methods=["ar"], limit=1, max_tokens=4, sampling={"temperature": 0.7},
                  out=tmp_path / "out2", command="", same_text=True)


def test_sampled_runs_bound_on_ars_sampled_text(tmp_path, model_path):
    """A user comparing sampled speedups sees what the context's drafts could have earned on a
    sample of the same distribution, computed on the text ar drew."""
    (tmp_path / "mgsm_zh.tsv").write_text("小明有3个苹果，又买了5个。他现在有几个苹果？\t8\n")
    data = bench.run(model=model_path, threads=1, n_ctx=512, n_gpu_layers=0, suite="mgsm-zh",
                     data_dir=tmp_path, methods=["ar", "pld"], limit=1, max_tokens=24,
                     sampling={"temperature": 0.8, "top_p": 0.95, "seed": 7}, out=tmp_path / "out",
                     command="", echo=lambda line: None)
    (p,) = data["prompts"].values()
    ar = p["runs"]["ar"]["turns"]
    assert [len(lengths) for lengths in p["draftable"]] == [len(t["tokens"]) for t in ar]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "it also knows the draws" in report
    table = report.split("Bound on `ar`'s sampled text")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| category | bound | pld |"
    assert table[-1].startswith("| **overall** |") and float(table[-1].split(" | ")[1].rstrip("x")) >= 1.0


def test_the_drafts_worth_prices_each_step_by_the_cost_curve():
    curve = {"sizes": [1, 2, 4], "relative": [1.0, 2.0, 2.5]}
    # 3 one-node steps (3 tokens) and 2 four-node steps that committed 4 tokens each: 11 tokens
    # for 3 x 1.0 + 2 x 2.5 = 8 units of t(1).
    m = {"generated_tokens": 11, "tree_sizes": {"1": 3, "4": 2}}
    assert bench_report.curve_speedup(m, curve) == pytest.approx(11 / 8)
    assert bench_report.curve_speedup({"generated_tokens": 5, "tree_sizes": {}}, curve) is None
    curve["long_relative"] = [1.0, 2.0, 3.0]  # after a long context: 3 x 1.0 + 2 x 3.0 = 9 units
    assert bench_report.curve_speedup(m, curve, "long_relative") == pytest.approx(11 / 9)
    stats = Stats()
    for drafted, tokens in ((0, [1]), (3, [1, 2, 3, 4]), (3, [1, 2])):
        stats.add(Step(tokens, drafted, False))
    assert stats.tree_sizes == {1: 1, 4: 2}
