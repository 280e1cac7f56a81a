"""What the benchmark feeds the methods: prompt suites and chat formatting.

Suites: Spec-Bench (question.jsonl: categories, multi-turn `turns`), HumanEval (jsonl, wrapped
as "Implement the following code.\\n<prompt>" as speed benchmarks do) and MGSM Chinese
(question<TAB>answer). The files are never copied into this repository: they are read from a
directory (see `find_data_dir`). The methods are bench_methods.py's; how runs are scheduled,
compared and reported is bench.py's.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    return engine.chat_tokens([{"role": role, "content": text} for role, text in messages])


def reply_text(engine, text: str) -> str:
    """A generated answer as the next turn's history: cut at the chat format's first stop string
    (generations here do not stop at them, so a base model may run on into a made-up turn)."""
    cuts = [i for i in (text.find(s) for s in engine.chat_format.stop) if i >= 0]
    return text[: min(cuts)] if cuts else text
