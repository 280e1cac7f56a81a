"""The bench's three files from its data: results.json, report.md and speedup.png.

Pure functions of the dict `bench.run` builds (no model, no timing), so a report can be
rewritten from a results.json without rerunning anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from racer_local import headroom
from racer_local.bench_methods import BASELINE, LLAMA_CPP
from racer_local.costmodel import BUSY
from racer_local.stats import PARTS


def write_outputs(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(report(data))
    plot(data, out / "speedup.png")


def report(data: dict) -> str:
    lines = _header(data) + _method_table(data)
    lines += _category_table(data["summary"], list(data["summary"]), data.get("versus_peers") or {})
    if data.get("same_engine") is not None:
        lines += ["", f"Same engine: `{LLAMA_CPP}` (llama-server, no speculation) decodes at "
                  f"{data['same_engine']:.2f}x racer-local's `{BASELINE}` on the same prompts "
                  "(about 1.00 when the binding costs nothing)."]
    lines += _host_table(data["summary"])
    lines += _cost_table(data["cost_curve"]) + _worth(data["summary"], data["cost_curve"])
    lines += _bound_table(data)
    lines += _calibration_tables(data.get("calibration") or {})
    notes = _notes(data)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _header(data: dict) -> list[str]:
    s, env = data["settings"], data["environment"]
    return [
        "# racer-local bench", "",
        f"`{data['command']}` took {data['duration_s']:.0f} s on {data['date']}.", "",
        f"Model `{Path(env['model']).name}` (sha256 `{env['model_sha256'][:16]}…`, "
        f"{env['architecture']}), llama-cpp-python {env['llama_cpp_python']}, {env['threads']} "
        f"threads, n_ctx {env['n_ctx']}, {env['cpu']} ({env['cpu_count']} cores). Suite "
        f"{s['suite']}: {s['prompts']} prompts, up to {s['max_tokens']} tokens per turn, "
        f"temperature {s['temperature']}. {_rows(env)} Every prompt is prefilled cold; methods "
        f"interleaved prompt by prompt after one warm-up each{_repeats(s)}. Speedup is decode tokens/s "
        f"over `{BASELINE}` on the same prompts; e2e includes the prefill.", "",
    ]


def _repeats(settings: dict) -> str:
    n, t = settings.get("repeats", 1), settings.get("min_time", 0.0)
    more = (f"; a prompt whose decode took under {t:g} s got more rounds, up to "
            f"{settings['max_rounds']}, until a typical method's added up to that") if t > 0 else ""
    if n > 1:
        return f", {n} rounds of them{more}, each method's fastest run of a prompt kept"
    return f"{more}, each method's fastest run kept" if more else ""


def _rows(env: dict) -> str:
    """Which rows racer-local's methods read (--candidates)."""
    if "top_k_on_backend" not in env:  # an older run
        return ""
    where = f"each node's top {env['top_k_on_backend']} from llama.cpp's graph" if env["top_k_on_backend"] \
        else "full logits rows on the host"
    line = f"racer-local read {where} (--candidates {env['candidates']})."
    if env.get("output_layer") == "native":
        line += (" Rows of batches of 2 or more came from racer-local's own output layer (--output-layer)"
                 + (f", as each row's best {env['native_top_k']}, not full rows." if env.get("native_top_k")
                    else "."))
    elif env.get("output_layer_why"):
        line += f" llama.cpp computed every row (racer-local's output layer: {env['output_layer_why']})."
    return line


def _method_table(data: dict) -> list[str]:
    lines = ["| method | prompts | failed | tokens | tok/s | speedup | tokens/step | e2e tok/s "
             "| e2e speedup | identical / near-tie / diverged |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, by in data["summary"].items():
        m = by["overall"]
        agree = (f"{m['identical']} / {m['near-tie']} / {m['diverged']}"
                 if data["settings"]["temperature"] == 0 else "n/a")
        lines.append(f"| {label} | {m['prompts']} | {m['failed']} | {m['generated_tokens']} | "
                     f"{m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {m['tokens_per_step']:.2f} | "
                     f"{m['e2e_tokens_per_s']:.1f} | {m['e2e_speedup']:.2f}x | {agree} |")
    return lines


def _category_table(summary: dict, labels: list[str], versus: dict) -> list[str]:
    """Speedup per category and overall, with the best peer's and racer's ratio over it, and
    with repeats the noise those are read against."""
    groups = {c: {label: summary[label]["categories"][c] for label in labels}
              for c in summary[BASELINE]["categories"]}
    groups["overall"] = {label: summary[label]["overall"] for label in labels}
    noise = {c: _median([m["spread"] for m in by_label.values() if m.get("spread") is not None])
             for c, by_label in groups.items()}
    noisy = any(v is not None for v in noise.values())
    extra = (" | best peer | racer / best peer" if versus else "") + (" | round spread" if noisy else "")
    lines = ["", f"Decode speedup over `{BASELINE}` by category:", "",
             "| category | prompts | " + " | ".join(labels) + extra + " |",
             "|---|--:|" + "--:|" * len(labels) + ("---|--:|" if versus else "") + ("--:|" if noisy else "")]
    for c, by_label in groups.items():
        cells = [f"{by_label[label]['speedup']:.2f}x" for label in labels]
        if versus:
            v = versus[c]
            cells += [f"{v['best_peer']} {v['peer_speedup']:.2f}x", f"**{v['ratio']:.2f}x**"]
        if noisy:
            cells.append("n/a" if noise[c] is None else f"{noise[c]:.0%}")
        name = "**overall**" if c == "overall" else c
        lines.append(f"| {name} | {by_label[BASELINE]['prompts']} | " + " | ".join(cells) + " |")
    if noisy:
        lines += ["", "Round spread: the median over the methods of how much longer a method's slowest "
                  "round took to decode the category's prompts than its fastest. The figures above keep "
                  "each method's fastest run of a prompt; a difference between methods smaller than the "
                  "spread is within this machine's noise."]
    return lines


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _host_table(summary: dict) -> list[str]:
    """Where a step's time goes, for the methods racer-local runs (llama-server's are opaque)."""
    ours = {label: by["overall"] for label, by in summary.items()
            if by["overall"].get("host_share") is not None}  # None: opaque; absent: an older run
    if not ours:
        return []
    lines = ["", "Per step (ms): drafting (the copy-logit table's top-k included), building the batch, "
             "the llama_decode call, fetching rows, choosing tokens along the tree (full rows' argmax "
             "included), the rest (KV commit, loop); host share is all but llama_decode:", "",
             "| method | steps | draft | build | llama_decode | read | walk | rest | host share |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, m in ours.items():
        n = max(1, m["steps"])
        parts = [m.get(part, 0.0) for part in PARTS]
        cells = [1e3 * p / n for p in (*parts, m["decode_s"] - sum(parts))]
        lines.append(f"| {label} | {m['steps']} | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {m['host_share']:.1%} |")
    return lines


def _curve_rows(curve: dict) -> list[tuple[str, str]]:
    """(where, key) of each row of t(N)/t(1) the curve has: one (where ""), or a short and a
    long context's (where " after N tokens")."""
    if not curve.get("long_relative"):
        return [("", "relative")]
    short, long = curve["contexts"]
    return [(f" after {short} tokens", "relative"), (f" after {long} tokens", "long_relative")]


def _cost_table(curve: dict) -> list[str]:
    sizes = [n for n in (1, 2, 4, 8, 12, 16, 24, 32) if n in curve["sizes"]]
    table = []
    for i, (where, key) in enumerate(_curve_rows(curve)):
        name = (("t(N)/t(1)" if i == 0 else "") + where).strip()
        rel = dict(zip(curve["sizes"], curve[key], strict=True))
        table.append(f"| {name} | " + " | ".join(f"{rel[n]:.2f}" for n in sizes) + " |")
    return ["", "Cost of verifying N tokens in one batch relative to one (this machine):", "",
            "| N | " + " | ".join(map(str, sizes)) + " |", "|---|" + "--:|" * len(sizes),
            *table, "",
            f"Ceiling of any tree with every draft accepted: {curve['ceiling']:.2f}x "
            f"(N = {curve['ceiling_n']})."]


def _relative(curve: dict, key: str, n: int) -> float:
    """t(n)/t(1) from the curve's row `key` (measured sizes exactly, linear between)."""
    return float(np.interp(n, curve["sizes"], curve[key]))


def curve_speedup(m: dict, curve: dict, relative: str = "relative") -> float | None:
    """A method's decode speedup over `ar` had every step cost what the curve says for its tree
    (tokens over the sum of t(N)/t(1)): what its drafts were worth, with machine noise and every
    cost the curve leaves out removed. None for methods whose steps are not seen (llama-server).
    `relative`: which of the curve's rows prices them (the short context's or the long one's)."""
    sizes = {int(n): steps for n, steps in (m.get("tree_sizes") or {}).items()}  # JSON keys are strings
    cost = sum(steps * _relative(curve, relative, n) for n, steps in sizes.items())
    return m["generated_tokens"] / cost if cost > 0 else None


def _worth(summary: dict, curve: dict) -> list[str]:
    """Priced by both of the curve's rows where it has two: the bench's turns run between its
    contexts, and the long one is the closer (gemma-3-270m, greedy: verification times fitted
    per tree size gave t(16)/t(1) 6.2-6.4, the curve 5.44 after 64 tokens and 6.21 after 1,024)."""
    parts = []
    for where, key in _curve_rows(curve):
        worth = {label: curve_speedup(by["overall"], curve, key)
                 for label, by in summary.items() if label != BASELINE}
        worth = {label: w for label, w in worth.items() if w is not None}
        if worth:
            priced = ", ".join(f"{label} {w:.2f}x" for label, w in worth.items())
            parts.append(f"priced by that curve{where}: {priced}")
    if not parts:
        return []
    return ["", "The same steps (tokens over the sum of t(N)/t(1), the tree sizes the methods verified) "
            + "; ".join(parts) + ". That is what the drafts were worth, free of machine noise; the "
            "measured speedups differ from it by what the steps cost beyond the curve (host work, "
            "and contexts other than the curve's)."]


def _bound_table(data: dict) -> list[str]:
    """Per category, the bound on what the copy and retrieval sources could give on `ar`'s text
    (headroom.py; sampled, on its draw) beside each of racer-local's methods priced alike, both
    by the curve's last row (the long context's, the closer: see _worth)."""
    curve, summary = data["cost_curve"], data["summary"]
    texts = [(p["category"], lengths) for p in data["prompts"].values() for lengths in p.get("draftable", [])]
    if not texts:
        return []
    where, key = _curve_rows(curve)[-1]
    totals: dict[str, list[float]] = {}
    for category, lengths in texts:
        for group in (category, "overall"):
            got = totals.setdefault(group, [0, 0.0])
            got[0] += len(lengths)
            got[1] += headroom.cheapest(lengths, lambda n: _relative(curve, key, n), curve["sizes"])
    bound = {c: n / cost for c, (n, cost) in totals.items() if cost > 0}
    labels = [label for label, by in summary.items()
              if label != BASELINE and curve_speedup(by["overall"], curve, key) is not None]
    sampled = data["settings"]["temperature"] > 0
    lines = ["", f"Bound on `ar`'s {'sampled ' if sampled else ''}text: at every step the longest draft "
             "the copy source or the n-gram index held that the target accepts, through the text at "
             f"the least cost by the curve{where}, beside racer-local's methods priced by the same row. "
             "An oracle on racer's two context sources; the copy-logit table is left out (its drafts "
             "depend on the rows verified). "
             + ("Sampled, it also knows the draws, and each method samples its own text from the same "
                "distribution (one seed, but the texts part where a batched row's last bits move a "
                "draw), so a category's bound is that of one sample. " if sampled else "")
             + "Where a method is far below it, better trees would pay; where the bound "
             "itself is low, only cheaper verification or other sources can:", "",
             "| category | bound |" + "".join(f" {label} |" for label in labels),
             "|---|--:|" + "--:|" * len(labels)]
    for c in [*dict.fromkeys(category for category, _ in texts), "overall"]:
        cells = [curve_speedup(summary[label]["overall"] if c == "overall"
                               else summary[label]["categories"][c], curve, key) for label in labels]
        name = "**overall**" if c == "overall" else c
        lines.append(f"| {name} |" + "".join(" - |" if x is None else f" {x:.2f}x |"
                                             for x in (bound.get(c), *cells)))
    return lines


def _calibration_tables(calibration: dict) -> list[str]:
    lines = []
    for label, rows in calibration.items():
        lines += ["", f"`{label}` calibration: for the candidates the walk tried (their parent "
                  "accepted), the chance the tree search gave them (their kind's rate, less what "
                  "likelier siblings took) vs how often they were accepted, by source and depth:", "",
                  "| source | depth | trials | predicted | observed |", "|---|--:|--:|--:|--:|"]
        lines += [f"| {r['source']} | {r['depth']} | {r['trials']} | {r['predicted']:.2f} | "
                  f"{r['observed']:.2f} |" for r in rows]
    return lines


def _notes(data: dict) -> list[str]:
    curve, summary = data["cost_curve"], data["summary"]
    notes = []
    if curve["implausible"] or curve["measured_busy"]:
        why = (f"says verifying N = {curve['implausible']} tokens costs less than one"
               if curve["implausible"] else "was measured in this run while the machine was busy")
        notes.append(f"The cached cost curve {why}: racer's tree sizes and the ceiling above are "
                     "unreliable. Delete it (costs/ in racer-local's cache dir) and rerun.")
    notes += [f"`{label}` warm-up failed: {err}" for label, err in data["warmup_errors"].items()]
    notes += [f"`{label}` failed on {pid}: {run['error']}" for pid, p in data["prompts"].items()
              for label, run in p["runs"].items() if run["error"]]
    busy = [pid for pid, p in data["prompts"].items()
            if p["cpu_share"] is not None and p["cpu_share"] < BUSY]
    if data["settings"].get("same_text"):
        notes.append("Same text (--same-text): racer-local's methods committed `ar`'s tokens on every "
                     "prompt, their drafts verified and timed as usual, so they are compared on one "
                     "text (their identical column says nothing); llama.cpp's methods decoded their own.")
    if data["environment"].get("rpc"):
        notes.append(f"The model's layers ran on RPC workers ({', '.join(data['environment']['rpc'])}): "
                     "the quiet-machine check, which needs their CPU time, was off.")
    if busy:
        notes.append(f"The machine was busy (the bench and its llama-server peers got under "
                     f"{BUSY:.0%} of their threads' CPU time) during {len(busy)} of "
                     f"{len(data['prompts'])} prompts ({', '.join(busy)}): their timings are "
                     "unreliable; rerun on a quiet machine.")
    short = {label: summary[label]["overall"]["stopped_early"] for label in summary}
    if any(short.values()):
        notes.append("Prompts whose output ended (end of sequence) before the token limit; speed "
                     "is measured on the tokens produced: "
                     + ", ".join(f"{k} {v}" for k, v in short.items()) + ".")
    return notes


def plot(data: dict, path: Path) -> None:
    """Grouped bars: decode speedup per category (and overall) per method, with the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, env = data["summary"], data["environment"]
    labels = [label for label in summary if label != BASELINE]
    groups = [*summary[BASELINE]["categories"], "overall"]
    fig, ax = plt.subplots(figsize=(min(14.0, 4 + 0.3 * len(groups) * max(2, len(labels))), 4.5))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        s = summary[label]
        values = [s["categories"][g]["speedup"] for g in groups[:-1]] + [s["overall"]["speedup"]]
        failed = s["overall"]["failed"]
        name = f"{label} ({failed} failed)" if failed else label
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ceiling = data["cost_curve"]["ceiling"]
    ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1,
               label=f"cost-curve ceiling {ceiling:.2f}x")
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(f"decode speedup over {BASELINE}")
    ax.set_title(f"{Path(env['model']).name}: threads={env['threads']}, "
                 f"max_tokens={data['settings']['max_tokens']}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside: bars stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
