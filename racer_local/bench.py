"""`racer-local bench`: decode speedup over plain decoding on public prompt sets, measured fairly.

One Engine serves every method (same model, context and threads). Each method gets one warm-up
generation; then, prompt by prompt, every method runs in turn (the order rotates per prompt) so
machine noise hits all alike. The KV cache is cleared before every generation, so each prompt is
prefilled cold, and every generation gets a fresh drafter. Prefill and decode are timed apart.
Aggregates are totals (sum of tokens / sum of seconds), never means of ratios, and a method's
speedup is over `ar` on the same prompts. Failures are recorded with their error and counted.
Writes results.json, report.md and speedup.png. Prompts and chat formatting: bench_suites.py.
Leaves out: sampling quality (no task scores) and driving llama.cpp's C++ binaries.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from racer_local import bench_suites as suites
from racer_local.cli import _friendly_errors, model_options
from racer_local.drafters import DRAFTERS
from racer_local.stats import Stats

BASELINE = "ar"
LCP_PLD = "llama-cpp-python-pld"
CPP_NGRAM = "llama.cpp-ngram"  # prefix of the llama.cpp C++ peers' method names
# Where a speculative output first differs from `ar`, a plain-decoding top-2 margin below this
# (logits) is a near-tie that batched kernels may flip: the bound tests/test_lossless.py measured.
NEAR_TIE = 1.0
SUMS = ("generated_tokens", "prefill_s", "decode_s", "steps", "drafted", "accepted")


@dataclass
class Turn:
    stats: Stats
    tokens: list[int]
    text: str
    finish_reason: str
    prompt: list[int] = field(repr=False)  # prompt token ids, kept for the near-tie check


@dataclass
class Run:
    """One method on one prompt (all of its turns)."""

    turns: list[Turn] = field(default_factory=list)
    error: str | None = None
    agreement: str | None = None  # vs ar: "identical", "near-tie" or "diverged" (greedy only)
    diverged_at: int | None = None  # index of the first differing token, turns concatenated
    margin: float | None = None  # ar's top-2 logit margin there


# ----- methods ------------------------------------------------------------------------------


class EngineMethod:
    """A drafter from racer_local.drafters, run through the shared Engine."""

    def __init__(self, engine, method: str) -> None:
        self.engine, self.method = engine, method

    def generate(self, prompt: list[int], max_tokens: int, temperature: float, seed: int) -> Turn:
        self.engine.reset()  # cold prefill for every method alike
        c = self.engine.generate(prompt, max_tokens=max_tokens, method=self.method,
                                 temperature=temperature, seed=seed)
        return Turn(c.stats, c.tokens, c.text, c.finish_reason, prompt)

    def close(self) -> None:
        pass


class LlamaCppPythonPLD:
    """llama-cpp-python's own speculative path: Llama(draft_model=LlamaPromptLookupDecoding).

    Timed like the Engine: prefill ends at the first token; decode covers the forward passes
    over the N generated tokens, i.e. until the (N+1)-th token is known (it is not counted).
    """

    def __init__(self, engine) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        b = engine.backend
        self.backend = b
        self.llm = Llama(str(engine.model_path), n_ctx=b.n_ctx, n_batch=b.n_batch, n_threads=b.n_threads,
                         n_threads_batch=b.n_threads, n_gpu_layers=b.n_gpu_layers, logits_all=True,
                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), verbose=False)
        self.evals: list[int] = []  # batch sizes of llm.eval calls
        real_eval = self.llm.eval

        def counted_eval(tokens):
            self.evals.append(len(tokens))
            return real_eval(tokens)

        self.llm.eval = counted_eval

    def generate(self, prompt: list[int], max_tokens: int, temperature: float, seed: int) -> Turn:
        llm = self.llm
        llm.reset()  # n_tokens = 0: the next eval clears the KV cache, a cold prefill
        llm.set_seed(seed)
        self.evals.clear()
        tokens: list[int] = []
        t0 = time.perf_counter()
        gen = llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        try:
            first = next(gen)
            t1 = time.perf_counter()
            prefill_evals = len(self.evals)
            token = first
            while True:
                tokens.append(token)
                if self.backend.is_eog(token) or len(tokens) > max_tokens:
                    break
                token = next(gen)
            t2 = time.perf_counter()
        finally:
            gen.close()
        finish = "stop" if self.backend.is_eog(tokens[-1]) else "length"
        tokens = tokens[:max_tokens]
        decoded = self.evals[prefill_evals:]
        stats = Stats(prompt_tokens=len(prompt), generated_tokens=len(tokens), prefill_s=t1 - t0,
                      decode_s=t2 - t1, steps=len(decoded), drafted=sum(n - 1 for n in decoded))
        stats.accepted = max(0, stats.generated_tokens - stats.steps)
        text = self.backend.detokenize(tokens[:-1] if finish == "stop" else tokens)
        return Turn(stats, tokens, text, finish, prompt)

    def close(self) -> None:
        self.llm.close()


class Broken:
    """Stands in for a method that could not start: every generation reports why."""

    def __init__(self, error: str) -> None:
        self.error = error

    def generate(self, *args, **kwargs) -> Turn:
        raise RuntimeError(self.error)

    def close(self) -> None:
        pass


def labels_for(methods: list[str]) -> list[tuple[str, str]]:
    """(label, method) pairs with `ar` first; a repeated method gets a numbered label (ar#2)."""
    if BASELINE not in methods:
        methods = [BASELINE, *methods]
    seen: dict[str, int] = {}
    out = []
    for m in methods:
        seen[m] = seen.get(m, 0) + 1
        out.append((m if seen[m] == 1 else f"{m}#{seen[m]}", m))
    out.sort(key=lambda lm: lm[0] != BASELINE)
    return out


def cpp_peer_status() -> str:
    found = [p for p in (shutil.which("llama-server"), shutil.which("llama-lookup")) if p]
    if not found:
        return "not found: neither llama-server nor llama-lookup is on PATH"
    return f"found {', '.join(found)}, but driving llama.cpp's binaries is not implemented yet"


def make_method(engine, method: str):
    if method in DRAFTERS:
        return EngineMethod(engine, method)
    if method == LCP_PLD:
        try:
            return LlamaCppPythonPLD(engine)
        except Exception as e:  # report it as this method's failure on every prompt
            return Broken(f"could not start: {type(e).__name__}: {e}")
    raise ValueError(f"unknown method {method!r}")


# ----- running ------------------------------------------------------------------------------


def run_prompt(engine, runner, prompt: suites.Prompt, max_tokens: int, temperature: float,
               seed: int) -> Run:
    """Every turn of `prompt`; later turns follow this method's own earlier answers."""
    run, messages = Run(), []
    try:
        for text in prompt.turns:
            messages.append(("user", text))
            ids = engine.tokenize(suites.format_chat(engine.backend, messages))
            turn = runner.generate(ids, max_tokens, temperature, seed)
            run.turns.append(turn)
            messages.append(("assistant", turn.text))
    except Exception as e:  # recorded and counted as a failure, never dropped
        run.error = f"{type(e).__name__}: {e}"
    return run


def run_all(engine, runners: dict, prompts: list[suites.Prompt], *, max_tokens: int,
            temperature: float, seed: int, progress: bool = True):
    """({prompt id: {label: Run}}, {label: warm-up error}); methods interleaved per prompt."""
    from tqdm import tqdm

    labels = list(runners)
    warmup_errors = {}
    first = prompts[0]
    for label in labels:
        warm = run_prompt(engine, runners[label], suites.Prompt("warm-up", "", "", first.turns[:1]),
                          min(8, max_tokens), temperature, seed)
        if warm.error:
            warmup_errors[label] = warm.error
    results: dict[str, dict[str, Run]] = {}
    bar = tqdm(total=len(prompts) * len(labels), unit="run", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with bar:
        for k, prompt in enumerate(prompts):
            results[prompt.id] = {}
            for label in labels[k % len(labels):] + labels[: k % len(labels)]:
                bar.set_postfix_str(f"{prompt.id} {label}", refresh=False)
                results[prompt.id][label] = run_prompt(engine, runners[label], prompt, max_tokens,
                                                       temperature, seed)
                bar.update(1)
    return results, warmup_errors


def compare_greedy(engine, runs: dict[str, Run], baseline: str = BASELINE) -> None:
    """Mark each successful run identical / near-tie / diverged against `baseline`'s tokens."""
    base = runs[baseline]
    if base.error:
        return
    for label, run in runs.items():
        if run.error or label == baseline:
            run.agreement = "identical" if label == baseline and not run.error else run.agreement
            continue
        offset = 0
        for mine, theirs in zip(run.turns, base.turns):
            i = next((i for i, (a, b) in enumerate(zip(mine.tokens, theirs.tokens)) if a != b), None)
            if i is None and len(mine.tokens) != len(theirs.tokens):
                i = min(len(mine.tokens), len(theirs.tokens))
            if i is not None:
                run.diverged_at = offset + i
                run.margin = _margin(engine, theirs.prompt + theirs.tokens[:i])
                run.agreement = "near-tie" if run.margin < NEAR_TIE else "diverged"
                break
            offset += len(mine.tokens)
        else:
            run.agreement = "identical"


def _margin(engine, context: list[int]) -> float:
    """Top-2 logit gap of the next token after `context` (one batched prefill, untimed)."""
    engine.reset()
    try:
        row = engine.backend.prefill(context, 0, n_logits=1)[-1]
    finally:
        engine.reset()
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])


# ----- metrics ------------------------------------------------------------------------------


def _totals(runs: list[Run]) -> dict:
    return {k: sum(getattr(t.stats, k) for r in runs for t in r.turns) for k in SUMS}


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def metrics(pairs: list[tuple[Run, Run]]) -> dict:
    """Totals for (run, baseline run) pairs; rates and speedups only over prompts both finished."""
    both = [(r, b) for r, b in pairs if r.error is None and b.error is None]
    mine, base = _totals([r for r, _ in both]), _totals([b for _, b in both])
    m = {"prompts": len(both), "failed": sum(r.error is not None for r, _ in pairs),
         "baseline_failed": sum(r.error is None and b.error is not None for r, b in pairs), **mine}
    m["mean_accepted"] = m["generated_tokens"] / m["steps"] if m["steps"] else 0.0
    m["tokens_per_s"] = _rate(mine["generated_tokens"], mine["decode_s"])
    m["baseline_tokens_per_s"] = _rate(base["generated_tokens"], base["decode_s"])
    m["speedup"] = _rate(m["tokens_per_s"], m["baseline_tokens_per_s"])
    m["e2e_tokens_per_s"] = _rate(mine["generated_tokens"], mine["prefill_s"] + mine["decode_s"])
    m["baseline_e2e_tokens_per_s"] = _rate(base["generated_tokens"], base["prefill_s"] + base["decode_s"])
    m["e2e_speedup"] = _rate(m["e2e_tokens_per_s"], m["baseline_e2e_tokens_per_s"])
    m["stopped_early"] = sum(any(t.finish_reason != "length" for t in r.turns) for r, _ in both)
    for kind in ("identical", "near-tie", "diverged"):
        m[kind] = sum(r.agreement == kind for r, _ in both)
    return m


def summarize(results: dict[str, dict[str, Run]], prompts: list[suites.Prompt], labels: list[str],
              baseline: str = BASELINE) -> dict:
    """{label: {"overall": metrics, "categories": {category: metrics}}}."""
    categories = list(dict.fromkeys(p.category for p in prompts))
    out = {}
    for label in labels:
        def pairs(ps, label=label):
            return [(results[p.id][label], results[p.id][baseline]) for p in ps]

        out[label] = {"overall": metrics(pairs(prompts)),
                      "categories": {c: metrics(pairs([p for p in prompts if p.category == c]))
                                     for c in categories}}
    return out


# ----- environment and outputs --------------------------------------------------------------


def environment(engine) -> dict:
    import llama_cpp

    path = Path(engine.model_path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"model": str(path), "model_bytes": path.stat().st_size, "model_sha256": digest.hexdigest(),
            "architecture": engine.backend.meta("general.architecture"),
            "racer_local": importlib.metadata.version("racer-local"),
            "llama_cpp_python": llama_cpp.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": engine.backend.n_threads,
            "n_ctx": engine.backend.n_ctx, "n_gpu_layers": engine.backend.n_gpu_layers}


def cost_curve(engine) -> dict:
    """The cost curve t(N)/t(1) racer sizes its trees from, and the ceiling it implies for any
    N-node tree even if all were accepted: max over N of N / relative(N)."""
    from racer_local import costmodel

    curve = costmodel.cached(engine.backend)
    ceiling, at = max((n / curve.relative(n), n) for n in curve.sizes)
    return {**curve.to_dict(), "ceiling": ceiling, "ceiling_n": at}


def _run_json(run: Run) -> dict:
    return {"error": run.error, "agreement": run.agreement, "diverged_at": run.diverged_at,
            "margin": run.margin,
            "turns": [{"stats": t.stats.to_dict(), "finish_reason": t.finish_reason, "tokens": t.tokens,
                       "text": t.text} for t in run.turns]}


def write_outputs(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(report(data))
    plot(data, out / "speedup.png")


def report(data: dict) -> str:
    s, env, curve, summary = data["settings"], data["environment"], data["cost_curve"], data["summary"]
    labels = list(summary)
    lines = [
        "# racer-local bench", "",
        f"`{data['command']}` took {data['duration_s']:.0f} s on {data['date']}.", "",
        f"Model `{Path(env['model']).name}` (sha256 `{env['model_sha256'][:16]}…`, {env['architecture']}), "
        f"llama-cpp-python {env['llama_cpp_python']}, {env['threads']} threads, n_ctx {env['n_ctx']}, "
        f"{env['cpu']} ({env['cpu_count']} cores). Suite {s['suite']}, {s['prompts']} prompts, "
        f"up to {s['max_tokens']} tokens per turn, temperature {s['temperature']}. Every prompt is "
        "prefilled cold; methods interleaved prompt by prompt after one warm-up each. Speedup is "
        f"decode tokens/s over `{BASELINE}` on the same prompts; e2e includes the prefill.", "",
        "| method | prompts | failed | tokens | tok/s | speedup | tokens/step | e2e tok/s | e2e speedup "
        "| identical / near-tie / diverged |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label in labels:
        m = summary[label]["overall"]
        agree = f"{m['identical']} / {m['near-tie']} / {m['diverged']}" if s["temperature"] == 0 else "n/a"
        lines.append(f"| {label} | {m['prompts']} | {m['failed']} | {m['generated_tokens']} | "
                     f"{m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {m['mean_accepted']:.2f} | "
                     f"{m['e2e_tokens_per_s']:.1f} | {m['e2e_speedup']:.2f}x | {agree} |")
    categories = list(summary[labels[0]]["categories"])
    lines += ["", "Decode speedup over `ar` by category:", "",
              "| category | prompts | " + " | ".join(labels) + " |",
              "|---|--:|" + "--:|" * len(labels)]
    for c in categories:
        cells = [f"{summary[label]['categories'][c]['speedup']:.2f}x" for label in labels]
        lines.append(f"| {c} | {summary[labels[0]]['categories'][c]['prompts']} | " + " | ".join(cells) + " |")
    sizes = [n for n in (1, 2, 4, 8, 12, 16, 24, 32) if n in curve["sizes"]]
    rel = dict(zip(curve["sizes"], curve["relative"]))
    lines += ["", "Cost of verifying N tokens in one batch, relative to one token (this machine):", "",
              "| N | " + " | ".join(map(str, sizes)) + " |", "|---|" + "--:|" * len(sizes),
              "| t(N)/t(1) | " + " | ".join(f"{rel[n]:.2f}" for n in sizes) + " |", "",
              f"Ceiling of any tree, all drafts accepted: {curve['ceiling']:.2f}x (N = {curve['ceiling_n']})."]
    notes = [f"`{label}` did not run: {why}" for label, why in data["unavailable"].items()]
    notes += [f"`{label}` warm-up failed: {err}" for label, err in data["warmup_errors"].items()]
    notes += [f"`{label}` failed on {pid}: {run['error']}" for pid, p in data["prompts"].items()
              for label, run in p["runs"].items() if run["error"]]
    short = {label: summary[label]["overall"]["stopped_early"] for label in labels}
    if any(short.values()):
        notes.append("Outputs that ended (end of sequence) before the token limit, measured on the "
                     "tokens they produced: " + ", ".join(f"{k} {v}" for k, v in short.items()) + ".")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    labels = [label for label in summary if label != BASELINE]
    groups = [*summary[BASELINE]["categories"], "overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(labels)) ** 0.5), 4))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        s = summary[label]
        values = [s["categories"][g]["speedup"] for g in groups[:-1]] + [s["overall"]["speedup"]]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ceiling = data["cost_curve"]["ceiling"]
    ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label=f"cost-curve ceiling {ceiling:.2f}x")
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(f"decode speedup over {BASELINE}")
    ax.set_title(f"{Path(data['environment']['model']).name}, {data['environment']['threads']} threads")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- command line -------------------------------------------------------------------------


def _parse_methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in DRAFTERS and m != LCP_PLD and not m.startswith(CPP_NGRAM):
            choices = ", ".join([*DRAFTERS, LCP_PLD, CPP_NGRAM + "-*"])
            raise click.BadParameter(f"unknown method {m!r}; choose from: {choices}", param_hint="--methods")
    return methods


def _command_line(params: dict) -> str:
    """The options this run used, as a command that repeats it."""
    words = ["racer-local", "bench"]
    for name, value in params.items():
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(words)


@click.command("bench")
@model_options
@click.option("--suite", type=click.Choice(["all", *suites.SUITES]), default="all", show_default=True)
@click.option("--data", envvar=suites.ENV_DATA, type=click.Path(file_okay=False),
              help=f"Directory with the prompt files (env {suites.ENV_DATA}; default ../shared/bench).")
@click.option("--methods", default=",".join(DRAFTERS), show_default=True,
              help=f"Comma-separated; ar is always included as the baseline; repeat one (ar,ar) to see "
                   f"the noise. Peers: {LCP_PLD}, {CPP_NGRAM}-* (needs llama-server or llama-lookup).")
@click.option("--limit", type=click.IntRange(min=1), help="Prompts per category, evenly spaced (default all).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens to generate per turn.")
@click.option("-t", "--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Directory for results.json, report.md and speedup.png.")
@_friendly_errors
def bench(model, threads, n_ctx, n_gpu_layers, suite, data, methods, limit, max_tokens, temperature,
          seed, out):
    """Measure decode speedup of each method over plain decoding on public prompt sets."""
    from racer_local.engine import Engine

    started = time.perf_counter()
    prompts = suites.load(suite, suites.find_data_dir(data), limit)
    if not prompts:
        raise click.ClickException(f"suite {suite!r} has no prompts")
    pairs, unavailable = [], {}
    for label, method in labels_for(_parse_methods(methods)):
        if method.startswith(CPP_NGRAM):
            unavailable[label] = cpp_peer_status()
        else:
            pairs.append((label, method))
    if unavailable:
        click.echo("; ".join(f"{k}: {v}" for k, v in unavailable.items()), err=True)
    with Engine(model, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers) as engine:
        curve = cost_curve(engine)  # measured before the runs if not cached, never during them
        runners = {label: make_method(engine, method) for label, method in pairs}
        try:
            results, warmup_errors = run_all(engine, runners, prompts, max_tokens=max_tokens,
                                             temperature=temperature, seed=seed)
        finally:
            for r in runners.values():
                r.close()
        if temperature == 0:
            for runs in results.values():
                compare_greedy(engine, runs)
        env = environment(engine)
    summary = summarize(results, prompts, list(runners))
    data = {
        "command": _command_line(click.get_current_context().params),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "duration_s": time.perf_counter() - started,
        "settings": {"suite": suite, "prompts": len(prompts), "methods": dict(pairs), "limit": limit,
                     "max_tokens": max_tokens, "temperature": temperature, "seed": seed},
        "environment": env, "cost_curve": curve, "unavailable": unavailable,
        "warmup_errors": warmup_errors, "summary": summary,
        "failures": sum(m["overall"]["failed"] for m in summary.values()),
        "prompts": {p.id: {"suite": p.suite, "category": p.category, "turns": list(p.turns),
                           "runs": {label: _run_json(run) for label, run in results[p.id].items()}}
                    for p in prompts},
    }
    write_outputs(Path(out), data)
    click.echo(report(data))
    click.echo(f"wrote results.json, report.md and speedup.png to {out}", err=True)
