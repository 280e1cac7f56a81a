"""`racer-local bench`: decode speedup over plain decoding on public prompt sets, measured fairly.

One Engine serves every method (same model, context and threads). Each method gets one warm-up
generation; then, prompt by prompt, every method runs in turn (the order rotates per prompt) so
machine noise hits all alike. The KV cache is cleared before every generation, so each prompt is
prefilled cold, and every generation gets a fresh drafter. Prefill and decode are timed apart.
Aggregates are totals (sum of tokens / sum of seconds), never means of ratios, and a method's
speedup is over `ar` on the same prompts. Failures are recorded with their error and counted.
Writes results.json, report.md and speedup.png (bench_report.py). Prompts and formatting live
in bench_suites.py, the methods (ours and llama.cpp's) in bench_methods.py, the command line in
cli.py. Leaves out task accuracy (no answer checking).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from racer_local import bench_methods as methods_
from racer_local import bench_report, defaults, headroom, topk
from racer_local import bench_suites as suites
from racer_local.bench_methods import BASELINE, LLAMA_CPP, Turn, peer_cpu_seconds
from racer_local.drafters import DRAFTERS
from racer_local.sampling import Sampler
from racer_local.stats import PARTS, Stats

# Where a speculative output first differs from `ar`, a plain-decoding top-2 margin below this
# (logits) is a near-tie that batched kernels may flip: the bound tests/test_lossless.py measured.
NEAR_TIE = 1.0
SUMS = ("generated_tokens", "prefill_s", "decode_s", "steps", "drafted", "accepted", *PARTS)


@dataclass
class Run:
    """One method on one prompt (all of its turns)."""

    turns: list[Turn] = field(default_factory=list)
    error: str | None = None
    agreement: str | None = None  # vs ar: "identical", "near-tie" or "diverged" (greedy only)
    diverged_at: int | None = None  # index of the first differing token, turns concatenated
    margin: float | None = None  # ar's top-2 logit margin there
    rounds: list[float] = field(default_factory=list)  # with repeats: each round's decode seconds


# ----- running ------------------------------------------------------------------------------


def run_prompt(engine, method, prompt: suites.Prompt, max_tokens: int, sampling: dict,
               replay: Run | None = None) -> Run:
    """Every turn of `prompt`; later turns follow this method's own earlier answers. With
    `replay` (a finished run) a method that can be pinned commits that run's tokens."""
    run, messages = Run(), []
    pinned = replay is not None and not replay.error and getattr(method, "replays", False)
    try:
        for i, text in enumerate(prompt.turns):
            messages.append(("user", text))
            ids = suites.chat_tokens(engine, messages)
            if pinned:
                turn = method.generate(ids, max_tokens, sampling, replay=replay.turns[i].tokens)
            else:
                turn = method.generate(ids, max_tokens, sampling)
            run.turns.append(turn)
            messages.append(("assistant", suites.reply_text(engine, turn.text)))
    except Exception as e:  # recorded and counted as a failure, never dropped
        run.error = f"{type(e).__name__}: {e}"
    return run


def run_all(engine, methods: dict, prompts: list[suites.Prompt], *, max_tokens: int,
            sampling: dict, progress: bool = True, same_text: bool = False, repeats: int = 1,
            min_time: float = 0.0):
    """Methods interleaved per prompt. Returns {prompt id: {label: Run}}, {label: warm-up
    error} and {prompt id: CPU share}: the CPU seconds of this process and its llama-server
    peers over wall seconds x threads while the prompt ran, which drops (to ~0.5) when
    another job competes for the cores. With `same_text`, `ar` runs first on each prompt
    and racer-local's other methods commit its tokens (greedy only). With `repeats`, every
    method runs the prompt that many times and its fastest run is kept, a failed one always;
    with `min_time`, a prompt runs more rounds until a typical method's decode adds up to it
    (rounds_for). No round learns from another: racer's start from the calibration the
    earlier prompts left, llama.cpp's after the first from a fresh server."""
    from tqdm import tqdm

    from racer_local.drafters.racer import saved_calibrations

    labels = list(methods)
    # The longest first turn: a method's first long prefill touches fresh KV and compute pages
    # (measured: 40% slower), which no method should pay inside the timed runs.
    longest = max(prompts, key=lambda p: len(p.turns[0]))
    warm_prompt = suites.Prompt("warm-up", "", "", longest.turns[:1])
    warmup_errors = {}

    def warm_up(label):
        warm = run_prompt(engine, methods[label], warm_prompt, min(8, max_tokens), sampling)
        if warm.error:
            warmup_errors.setdefault(label, warm.error)

    for label in labels:
        warm_up(label)
    results: dict[str, dict[str, Run]] = {}
    cpu_share: dict[str, float | None] = {}
    with tqdm(total=len(prompts) * len(labels) * repeats, unit="run", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for k, prompt in enumerate(prompts):
            results[prompt.id], text = {}, None
            wall, cpu = time.perf_counter(), _cpu_seconds(methods)
            restore = saved_calibrations(engine.backend)
            rounds: dict[str, list[float]] = {label: [] for label in labels}
            n_rounds, r = repeats, 0
            while r < n_rounds:
                if r:  # no round learns from another
                    restore()
                    for label in labels:  # a fresh llama-server: see LlamaCppServer.forget
                        if hasattr(methods[label], "forget"):
                            methods[label].forget()
                            warm_up(label)
                turn = (k + r) % len(labels)
                order = labels[turn:] + labels[:turn]
                if same_text:
                    order = [BASELINE, *(x for x in order if x != BASELINE)]
                for label in order:
                    bar.set_postfix_str(f"{prompt.id} {label}", refresh=False)
                    run = run_prompt(engine, methods[label], prompt, max_tokens, sampling, text)
                    if same_text and text is None and label == BASELINE:
                        text = run  # the first ar run's tokens, for every round
                    results[prompt.id][label] = _kept(results[prompt.id].get(label), run)
                    if run.error is None:
                        rounds[label].append(sum(t.stats.decode_s for t in run.turns))
                    bar.update(1)
                if r == 0:
                    n_rounds = rounds_for(repeats, min_time, [v[0] for v in rounds.values() if v])
                    bar.total += (n_rounds - repeats) * len(labels)
                r += 1
            if n_rounds > 1:
                for label in labels:
                    results[prompt.id][label].rounds = rounds[label]
            wall, cpu = time.perf_counter() - wall, _cpu_seconds(methods) - cpu
            cpu_share[prompt.id] = _cpu_share(engine, cpu, wall)
    return results, warmup_errors, cpu_share


def rounds_for(repeats: int, min_time: float, first: list[float]) -> int:
    """Rounds for a prompt whose first round's decode took `first` seconds per method: at least
    `repeats`, and enough for the median method's to add up to `min_time`, at most
    defaults.BENCH_MAX_ROUNDS. Short runs are the noisiest and the cheapest to repeat."""
    typical = float(np.median(first)) if first else 0.0
    if min_time <= 0 or typical <= 0:
        return repeats
    return max(repeats, min(defaults.BENCH_MAX_ROUNDS, math.ceil(min_time / typical)))


def _kept(best: Run | None, run: Run) -> Run:
    """Of two runs of one method on one prompt, the faster (prefill plus decode: the machine's
    noise only ever adds time), or the failed one: a failure is never hidden by a retry."""
    if best is None or run.error:
        return run
    if best.error:
        return best
    return run if _seconds(run) < _seconds(best) else best


def _seconds(run: Run) -> float:
    return sum(t.stats.prefill_s + t.stats.decode_s for t in run.turns)


def _cpu_share(engine, cpu: float, wall: float) -> float | None:
    """CPU seconds over wall seconds x threads; None with RPC workers, whose processes (perhaps
    on other machines) do most of the work."""
    return None if engine.backend.rpc else cpu / (wall * engine.backend.n_threads)


def _cpu_seconds(methods: dict) -> float:
    return time.process_time() + peer_cpu_seconds(methods.values())


def compare_greedy(engine, runs: dict[str, Run], baseline: str = BASELINE) -> None:
    """Mark each successful run identical / near-tie / diverged against `baseline`'s tokens,
    by the baseline's own top-2 margin where they part."""
    base = runs[baseline]
    if base.error:
        return
    base.agreement = "identical"
    margins: dict[int, list[float]] = {}  # the baseline's turn -> its margins, when first needed
    for label, run in runs.items():
        if run.error or label == baseline:
            continue
        offset = 0
        for t, (mine, theirs) in enumerate(zip(run.turns, base.turns, strict=False)):
            pairs = zip(mine.tokens, theirs.tokens, strict=False)
            i = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if i is None and len(mine.tokens) != len(theirs.tokens):
                i = min(len(mine.tokens), len(theirs.tokens))
            if i is not None:
                if t not in margins:
                    margins[t] = plain_margins(engine, theirs.prompt, theirs.tokens)
                run.diverged_at = offset + i
                run.margin = margins[t][i] if i < len(margins[t]) else None  # None: the baseline had ended
                run.agreement = "near-tie" if run.margin is not None and run.margin < NEAR_TIE else "diverged"
                break
            offset += len(mine.tokens)
        else:
            run.agreement = "identical"


def plain_margins(engine, prompt: list[int], tokens: list[int]) -> list[float]:
    """The top-2 logit gap of the row that chose each of `tokens`, on plain decoding's own path:
    the prompt prefilled cold, then one token a step, as `ar` decoded them. A batched prefill of
    prompt and tokens gives other logits: on a 639-token Spec-Bench RAG prompt (gemma-3-270m) it
    put 1.11 between the two best tokens where `ar`'s own row had 0.02. Outside any timing."""
    backend = engine.backend
    engine.reset()
    try:
        gaps = [topk.margin(backend.prefill(prompt, 0, n_logits=1)[-1])]
        for i, token in enumerate(tokens[:-1]):
            gaps.append(topk.margin(backend.decode([token], [len(prompt) + i])[0]))
    finally:
        engine.reset()
    return gaps


# ----- metrics ------------------------------------------------------------------------------


def _totals(runs: list[Run]) -> Stats:
    """One Stats summing every turn's counts and times: its rates are the aggregate ones."""
    total = Stats(**{k: sum(getattr(t.stats, k) for r in runs for t in r.turns) for k in SUMS})
    for t in (t for r in runs for t in r.turns):
        for n, steps in t.stats.tree_sizes.items():
            total.tree_sizes[n] = total.tree_sizes.get(n, 0) + steps
    return total


def draftable_lengths(results: dict[str, dict[str, Run]], longest: int) -> dict[str, dict]:
    """{prompt id: {"draftable": per turn of ar's text, headroom.draftable's lengths}} for the
    report's bound; prompts where ar failed are left out. Sampled, ar's text is one draw from
    the distribution every method's text follows, not the text each of them committed."""
    out = {}
    for pid, runs in results.items():
        ar = runs.get(BASELINE)
        if ar is not None and ar.error is None:
            out[pid] = {"draftable": [headroom.draftable(t.prompt, t.tokens, longest) for t in ar.turns]}
    return out


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def metrics(pairs: list[tuple[Run, Run]]) -> dict:
    """Totals for (run, baseline run) pairs; rates and speedups over prompts both finished."""
    both = [(r, b) for r, b in pairs if r.error is None and b.error is None]
    mine, base = _totals([r for r, _ in both]), _totals([b for _, b in both])
    m = {"prompts": len(both), "failed": sum(r.error is not None for r, _ in pairs),
         "baseline_failed": sum(r.error is None and b.error is not None for r, b in pairs),
         **{k: getattr(mine, k) for k in SUMS}}
    m["tokens_per_step"] = m["mean_accepted"] = mine.tokens_per_step  # old name kept
    m["tokens_per_s"] = mine.tokens_per_s
    m["baseline_tokens_per_s"] = base.tokens_per_s
    m["speedup"] = _rate(m["tokens_per_s"], m["baseline_tokens_per_s"])
    m["e2e_tokens_per_s"] = _rate(mine.generated_tokens, mine.prefill_s + mine.decode_s)
    m["baseline_e2e_tokens_per_s"] = _rate(base.generated_tokens, base.prefill_s + base.decode_s)
    m["e2e_speedup"] = _rate(m["e2e_tokens_per_s"], m["baseline_e2e_tokens_per_s"])
    m["host_share"] = mine.host_share
    m["tree_sizes"] = dict(sorted(mine.tree_sizes.items()))  # empty for llama-server's methods
    m["stopped_early"] = sum(any(t.finish_reason != "length" for t in r.turns) for r, _ in both)
    for kind in ("identical", "near-tie", "diverged"):
        m[kind] = sum(r.agreement == kind for r, _ in both)
    m["spread"] = round_spread([r for r, _ in both])
    return m


def round_spread(runs: list[Run]) -> float | None:
    """How much longer the slowest round's decode took than the fastest's, these prompts summed
    per round over the rounds they all ran (None without repeats): the machine's noise on this
    method here, so a difference between methods of that size says nothing."""
    n = min((len(r.rounds) for r in runs), default=0)  # short prompts may have run more rounds
    if n < 2:
        return None
    totals = [sum(r.rounds[i] for r in runs) for i in range(n)]
    return max(totals) / min(totals) - 1 if min(totals) > 0 else None


def summarize(results: dict[str, dict[str, Run]], prompts: list[suites.Prompt],
              labels: list[str], baseline: str = BASELINE) -> dict:
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
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    b = engine.backend
    return {"model": str(path), "model_bytes": path.stat().st_size,
            "model_sha256": digest.hexdigest(), "architecture": b.meta("general.architecture"),
            "racer_local": importlib.metadata.version("racer-local"),
            "llama_cpp_python": llama_cpp.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": b.n_threads, "n_ctx": b.n_ctx,
            "n_gpu_layers": b.n_gpu_layers, "rpc": list(b.rpc), "candidates": engine.candidates,
            "top_k_on_backend": b.top_k, "native_top_k": b.native_top_k, "output_layer": b.output_layer,
            "output_layer_why": b.output_layer_why}


def cost_curve(engine) -> dict:
    """The cost curve t(N)/t(1) racer sizes its trees from, and the ceiling it implies for any
    N-node tree even if every draft were accepted: max over N of N / relative(N)."""
    from racer_local import costmodel

    curve = costmodel.cached(engine.backend)
    ceiling, at = max((n / curve.relative(n), n) for n in curve.sizes)
    # The curve is cached on disk, so a distorted one misleads every later run: flag one measured
    # now while another job held the cores, or one saying N > 1 tokens cost much less than one.
    busy = bool(costmodel.measured_busy(engine.backend))
    implausible = [n for n in curve.sizes if curve.relative(n) < 0.9]
    return {**curve.to_dict(), "ceiling": ceiling, "ceiling_n": at, "measured_busy": busy,
            "implausible": implausible}


def _run_json(run: Run) -> dict:
    turns = [{"stats": t.stats.to_dict(), "finish_reason": t.finish_reason, "tokens": t.tokens,
              "text": t.text} for t in run.turns]
    return {"error": run.error, "agreement": run.agreement, "diverged_at": run.diverged_at,
            "margin": run.margin, "rounds_decode_s": run.rounds, "turns": turns}


# ----- racer against the peers --------------------------------------------------------------


def versus_peers(summary: dict, racer: str = "racer") -> dict:
    """Per category and overall: the best peer's decode speedup and racer's ratio over it.

    Peers are the methods racer-local did not write (llama.cpp's, llama-cpp-python's) and
    prompt lookup; a peer that failed on a prompt counts there with what it finished.
    """
    peers = [label for label in summary if methods_.is_peer(label)]
    if racer not in summary or not peers:
        return {}
    out = {}
    for name in [*summary[racer]["categories"], "overall"]:
        best = max(peers, key=lambda label: _group(summary[label], name)["speedup"])
        theirs, ours = _group(summary[best], name)["speedup"], _group(summary[racer], name)["speedup"]
        out[name] = {"best_peer": best, "peer_speedup": theirs, "racer_speedup": ours,
                     "ratio": _rate(ours, theirs)}
    return out


def _group(method_summary: dict, name: str) -> dict:
    """One method's metrics for a category, or for all prompts when name is "overall"."""
    return method_summary["overall"] if name == "overall" else method_summary["categories"][name]


def same_engine(summary: dict) -> float | None:
    """llama.cpp's plain decoding over racer-local's `ar`: about 1.0 when the binding costs nothing."""
    if LLAMA_CPP not in summary or not summary[LLAMA_CPP]["overall"]["prompts"]:
        return None
    return summary[LLAMA_CPP]["overall"]["speedup"]


# ----- one whole run ------------------------------------------------------------------------


def _runners(engine, pairs, sampling: dict, binary, build_error: str | None) -> dict:
    runners = {}
    try:
        for label, method in pairs:
            if method.startswith(LLAMA_CPP) and binary is None:
                runners[label] = methods_.Unavailable(f"no llama-server: {build_error}")
            else:
                runners[label] = methods_.make_method(engine, method, sampling, binary)
    except BaseException:  # stop the servers already started
        for runner in runners.values():
            runner.close()
        raise
    return runners


def run(*, model, threads, n_ctx, n_gpu_layers, suite: str, data_dir, methods: list[str],
        limit: int | None, max_tokens: int, sampling: dict, out: Path, command: str,
        llama_server=None, rpc=(), candidates: str = "auto", output_layer: str = "auto",
        same_text: bool = False, repeats: int = 1, min_time: float = 0.0, echo=print) -> dict:
    """Load the model, run every method on the suite's prompts, write the three files; the data.

    llama.cpp's methods need a llama-server: `llama_server` if given, else the cached build for
    this binding, else it is built now (minutes, once). If that fails, those methods are
    reported as failed with the reason. With `rpc` workers only the engine's methods run: a
    worker serves one client at a time, and the engine holds them. `same_text`, `repeats`,
    `min_time`: see run_all.
    """
    if same_text and sampling.get("temperature", 0) != 0:
        raise ValueError("--same-text pins every method to ar's greedy text: use it with temperature 0")
    from racer_local import ngram
    from racer_local.drafters.racer import calibration_table, shared_calibration
    from racer_local.engine import Engine
    from racer_local.llama_server_build import PeerBuildError, find_or_build

    started = time.perf_counter()
    prompts = suites.load(suite, data_dir, limit)
    if not prompts:
        raise suites.DataError(f"suite {suite!r} has no prompts")
    pairs = methods_.labels_for(methods)
    if rpc and (apart := [m for _, m in pairs if m not in DRAFTERS]):
        raise ValueError(f"{', '.join(apart)} cannot share the RPC workers with the engine (a worker "
                         "serves one client at a time): bench them without --rpc")
    binary, peer = None, {}
    if any(m.startswith(LLAMA_CPP) for _, m in pairs):
        try:
            binary = find_or_build(llama_server, echo=echo)
            peer = {"llama_server": str(binary)}
        except PeerBuildError as e:
            peer = {"llama_server": None, "error": str(e)}
            echo(f"llama.cpp peers will be reported as failed: {e}")
    with Engine(model, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, rpc=rpc or (),
                candidates=candidates, output_layer=output_layer) as engine:
        engine.read_rows(Sampler(**sampling).needs_full_rows)  # as the runs will: the curve is theirs
        curve = cost_curve(engine)  # measured now if not cached, never during the runs
        runners = _runners(engine, pairs, sampling, binary, peer.get("error"))
        try:
            results, warmup_errors, cpu_share = run_all(engine, runners, prompts,
                                                        max_tokens=max_tokens, sampling=sampling,
                                                        same_text=same_text, repeats=repeats,
                                                        min_time=min_time)
        finally:
            for runner in runners.values():
                runner.close()
        if sampling["temperature"] == 0:  # greedy: every method should give ar's tokens
            for runs in results.values():
                compare_greedy(engine, runs)
        draftable = draftable_lengths(results, curve["sizes"][-1] - 1)
        env = {**environment(engine), "native_index": ngram.NATIVE, **peer}
        calibration = {label: calibration_table(shared_calibration(engine.backend, method,
                                                                   sampling["temperature"] == 0))
                       for label, method in pairs if method in methods_.RACERS}
    summary = summarize(results, prompts, list(runners))
    data = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "duration_s": time.perf_counter() - started,
        "settings": {"suite": suite, "prompts": len(prompts), "methods": dict(pairs),
                     "limit": limit, "max_tokens": max_tokens, "same_text": same_text,
                     "repeats": repeats, "min_time": min_time, "max_rounds": defaults.BENCH_MAX_ROUNDS,
                     **sampling},
        "environment": env, "cost_curve": curve, "warmup_errors": warmup_errors,
        "summary": summary, "versus_peers": versus_peers(summary), "same_engine": same_engine(summary),
        "calibration": calibration,
        "failures": sum(m["overall"]["failed"] for m in summary.values()),
        # Prompts by id and turn count, not their text: the suites' data stays in their files.
        "prompts": {p.id: {"suite": p.suite, "category": p.category, "n_turns": len(p.turns),
                           "cpu_share": cpu_share[p.id], **draftable.get(p.id, {}),
                           "runs": {k: _run_json(r) for k, r in results[p.id].items()}}
                    for p in prompts},
    }
    bench_report.write_outputs(Path(out), data)
    return data
