"""What the benchmark runs: prompt suites, chat formatting, and the methods that generate.

Suites: Spec-Bench (question.jsonl: categories, multi-turn `turns`), HumanEval (jsonl, wrapped
as "Implement the following code.\\n<prompt>" as speed benchmarks do) and MGSM Chinese
(question<TAB>answer). The files are never copied into this repository: they are read from a
directory (see `find_data_dir`). Methods: every drafter through the shared Engine, and the
peer llama-cpp-python-pld; each turns prompt ids into a timed Turn, stopping only at the end
of generation or the token limit (no chat stop strings), alike for all. How runs are
scheduled, compared and reported is bench.py's business.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from racer_local.drafters import DRAFTERS
from racer_local.stats import Stats

SUITES = ("specbench", "humaneval", "mgsm-zh")
ENV_DATA = "RACER_LOCAL_BENCH_DATA"
# Spec-Bench reports the 8 MT-bench categories together as one "multi-turn conversation".
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
# Accepted file names per suite: ours first, then the names the sources publish them under.
FILES = {
    "specbench": ("specbench.jsonl", "question.jsonl"),
    "humaneval": ("humaneval.jsonl", "HumanEval.jsonl", "HumanEval.jsonl.gz"),
    "mgsm-zh": ("mgsm_zh.tsv",),
}
WHERE = (
    "get Spec-Bench data/spec_bench/question.jsonl from github.com/hemingkx/Spec-Bench, "
    "HumanEval.jsonl.gz from github.com/openai/human-eval and mgsm_zh.tsv from "
    "github.com/google-research/url-nlp (mgsm/), put them in one directory and pass --data DIR "
    f"or set {ENV_DATA}"
)


class DataError(ValueError):
    """Benchmark files are missing or unreadable; the message says where to get them."""


@dataclass(frozen=True)
class Prompt:
    id: str  # unique across suites, e.g. "specbench/81"
    suite: str
    category: str
    turns: tuple[str, ...]  # user turns; later turns follow the model's own earlier answers


def find_data_dir(given: str | os.PathLike | None = None) -> Path:
    """`given` (the --data option or RACER_LOCAL_BENCH_DATA), else ../shared/bench from the
    current directory or from the repository; a clear DataError when none exists."""
    if given:
        candidates = [Path(given).expanduser()]
    else:
        repo = Path(__file__).resolve().parents[1]
        candidates = [Path.cwd().parent / "shared" / "bench", repo.parent / "shared" / "bench"]
    for path in candidates:
        if path.is_dir():
            return path
    looked = ", ".join(dict.fromkeys(str(p) for p in candidates))
    raise DataError(f"benchmark prompts not found (looked in {looked}); {WHERE}")


def load(suite: str, data_dir: Path, limit: int | None = None) -> list[Prompt]:
    """The prompts of one suite (or "all"); `limit` keeps N evenly spaced prompts per category."""
    if suite == "all":
        return [p for s in SUITES for p in load(s, data_dir, limit)]
    if suite not in SUITES:
        raise DataError(f"unknown suite {suite!r}; choose one of: all, {', '.join(SUITES)}")
    path = next((data_dir / f for f in FILES[suite] if (data_dir / f).is_file()), None)
    if path is None:
        raise DataError(f"{data_dir} has no {' or '.join(FILES[suite])} for suite {suite!r}; {WHERE}")
    try:
        prompts = _READERS[suite](path)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{path} is not in the expected {suite} format: {e!r}") from e
    return _spread(prompts, limit)


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _specbench(path: Path) -> list[Prompt]:
    out = []
    for line in _lines(path):
        q = json.loads(line)
        category = "multi-turn" if q["category"] in MT_BENCH else q["category"]
        out.append(Prompt(f"specbench/{q['question_id']}", "specbench", category, tuple(q["turns"])))
    return out


def _humaneval(path: Path) -> list[Prompt]:
    out = []
    for line in _lines(path):
        task = json.loads(line)
        text = "Implement the following code.\n" + task["prompt"]
        out.append(Prompt(f"humaneval/{task['task_id']}", "humaneval", "humaneval", (text,)))
    return out


def _mgsm(path: Path) -> list[Prompt]:
    out = []
    for i, line in enumerate(_lines(path)):
        question, _answer = line.split("\t")
        out.append(Prompt(f"mgsm-zh/{i}", "mgsm-zh", "mgsm-zh", (question,)))
    return out


_READERS = {"specbench": _specbench, "humaneval": _humaneval, "mgsm-zh": _mgsm}


def _spread(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """N evenly spaced prompts of each category, in file order (so `--limit 2` on Spec-Bench's
    multi-turn category takes a writing and a coding question, not two writing ones)."""
    if limit is None:
        return prompts
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    keep = set()
    for items in by_category.values():
        n = min(limit, len(items))
        keep.update(items[i * len(items) // n].id for i in range(n))
    return [p for p in prompts if p.id in keep]


# ----- chat formatting ----------------------------------------------------------------------


def chat_tokens(engine, messages: list[tuple[str, str]]) -> list[int]:
    """Prompt token ids for (role, text) turns ending where the assistant speaks next, exactly as
    Engine.chat sends them: the engine's chat format (templates.py: the GGUF's own template,
    else Gemma turns for Gemma models, else a plain transcript) and its BOS handling."""
    return engine._tokenize_chat(engine.chat_format.render(messages))


def reply_text(engine, text: str) -> str:
    """A generated answer as the next turn's history: cut at the chat format's first stop string
    (generations here do not stop at them, so a base model may run on into a made-up turn)."""
    cuts = [i for i in (text.find(s) for s in engine.chat_format.stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


# ----- methods ------------------------------------------------------------------------------

BASELINE = "ar"
LCP_PLD = "llama-cpp-python-pld"
CPP_NGRAM = "llama.cpp-ngram"  # prefix of the llama.cpp C++ peers' method names


@dataclass
class Turn:
    """One generation: what a method produced for one prompt text, and how fast."""

    stats: Stats
    tokens: list[int]
    text: str
    finish_reason: str
    prompt: list[int] = field(repr=False)  # prompt token ids, kept for the near-tie check


class EngineMethod:
    """A drafter from racer_local.drafters, run through the shared Engine."""

    def __init__(self, engine, method: str) -> None:
        self.engine, self.method = engine, method

    def generate(self, prompt: list[int], max_tokens: int, sampling: dict) -> Turn:
        self.engine.reset()  # cold prefill for every method alike
        c = self.engine.generate(prompt, max_tokens=max_tokens, method=self.method, **sampling)
        return Turn(c.stats, c.tokens, c.text, c.finish_reason, prompt)

    def close(self) -> None:
        pass


class LlamaCppPythonPLD:
    """llama-cpp-python's own speculative path: Llama(draft_model=LlamaPromptLookupDecoding).

    Same model file, context, batch and threads as the Engine. Timed like the Engine: prefill
    ends when the first token is known; decode covers the forward passes over the N generated
    tokens, i.e. until the (N+1)-th token is known (that one is not counted).
    """

    def __init__(self, engine, repeat_last_n: int = 64) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        b = self.backend = engine.backend
        self.llm = Llama(str(engine.model_path), n_ctx=b.n_ctx, n_batch=b.n_batch,
                         n_threads=b.n_threads, n_threads_batch=b.n_threads,
                         n_gpu_layers=b.n_gpu_layers, logits_all=True, verbose=False,
                         last_n_tokens_size=repeat_last_n,
                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
        self.evals: list[int] = []  # batch size of every llm.eval call
        real_eval = self.llm.eval

        def counted_eval(tokens):
            self.evals.append(len(tokens))
            return real_eval(tokens)

        self.llm.eval = counted_eval

    def generate(self, prompt: list[int], max_tokens: int, sampling: dict) -> Turn:
        llm, is_eog = self.llm, self.backend.is_eog
        llm.reset()  # n_tokens = 0: the next eval clears the KV cache, a cold prefill
        if sampling.get("seed") is not None:
            llm.set_seed(sampling["seed"])
        self.evals.clear()
        tokens: list[int] = []
        t0 = time.perf_counter()
        gen = llm.generate(prompt, temp=sampling.get("temperature", 0.0),
                           top_k=sampling.get("top_k", 0), top_p=sampling.get("top_p", 1.0),
                           min_p=sampling.get("min_p", 0.0),
                           repeat_penalty=sampling.get("repeat_penalty", 1.0))
        try:
            token = next(gen)
            t1 = time.perf_counter()
            n_prefill = len(self.evals)
            while True:
                tokens.append(token)
                if is_eog(token) or len(tokens) > max_tokens:
                    break
                token = next(gen)
            t2 = time.perf_counter()
        finally:
            gen.close()
        tokens = tokens[:max_tokens]  # drop the (N+1)-th token, read only to time the N-th
        finish = "stop" if is_eog(tokens[-1]) else "length"
        decoded = self.evals[n_prefill:]
        stats = Stats(prompt_tokens=len(prompt), generated_tokens=len(tokens), prefill_s=t1 - t0,
                      decode_s=t2 - t1, steps=len(decoded), drafted=sum(n - 1 for n in decoded))
        stats.accepted = max(0, stats.generated_tokens - stats.steps)
        text = self.backend.detokenize(tokens[:-1] if finish == "stop" else tokens)
        return Turn(stats, tokens, text, finish, prompt)

    def close(self) -> None:
        self.llm.close()


class Unavailable:
    """Stands in for a method that could not start: every generation reports why."""

    def __init__(self, error: str) -> None:
        self.error = error

    def generate(self, *args, **kwargs) -> Turn:
        raise RuntimeError(self.error)

    def close(self) -> None:
        pass


def known_method(name: str) -> bool:
    return name in DRAFTERS or name == LCP_PLD or name.startswith(CPP_NGRAM)


def make_method(engine, method: str, sampling: dict):
    if method in DRAFTERS:
        return EngineMethod(engine, method)
    if method == LCP_PLD:
        try:
            return LlamaCppPythonPLD(engine, sampling.get("repeat_last_n", 64))
        except Exception as e:  # reported as this method's failure on every prompt
            return Unavailable(f"could not start: {type(e).__name__}: {e}")
    raise ValueError(f"unknown method {method!r}")


def labels_for(methods: list[str]) -> list[tuple[str, str]]:
    """(label, method) pairs with `ar` first; a repeated method gets a numbered label (ar#2)."""
    if BASELINE not in methods:
        methods = [BASELINE, *methods]
    seen: dict[str, int] = {}
    out = []
    for m in methods:
        seen[m] = seen.get(m, 0) + 1
        out.append((m if seen[m] == 1 else f"{m}#{seen[m]}", m))
    out.sort(key=lambda pair: pair[0] != BASELINE)
    return out


def cpp_peer_status() -> str:
    """Why llama.cpp's C++ n-gram modes are not in this run."""
    found = [p for p in (shutil.which("llama-server"), shutil.which("llama-lookup")) if p]
    if not found:
        return "not found: neither llama-server nor llama-lookup is on PATH"
    return f"found {', '.join(found)}, but driving llama.cpp's binaries is not implemented yet"
