"""Benchmark prompts: the public evaluation sets read in their own formats, and chat formatting.

Suites: Spec-Bench (question.jsonl: categories, multi-turn `turns`), HumanEval (jsonl, wrapped
as "Implement the following code.\\n<prompt>" as speed benchmarks do) and MGSM Chinese
(question<TAB>answer). The files are never copied into this repository: they are read from a
directory (see `find_data_dir`). Nothing here loads a model.
"""

from __future__ import annotations

import ctypes
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

GEMMA_TURNS = ("<start_of_turn>{role}\n{text}<end_of_turn>\n", "<start_of_turn>model\n")


def format_chat(backend, messages: list[tuple[str, str]]) -> str:
    """The text of a conversation ending where the assistant speaks next.

    `messages` are (role, text) with roles "user" and "assistant". The model's own chat template
    (applied by llama.cpp) when the GGUF has one; else Gemma's turn format for Gemma
    architectures (the embedded gemma-3-270m base model ships without a template); else the
    turns as plain text, one per paragraph. `backend` needs `chat_template` and `meta(key)`.
    """
    template = backend.chat_template
    if template:
        return _apply_template(template, messages)
    if (backend.meta("general.architecture") or "").startswith("gemma"):
        turn, reply = GEMMA_TURNS
        roles = {"user": "user", "assistant": "model"}
        return "".join(turn.format(role=roles[r], text=t) for r, t in messages) + reply
    return "".join(f"{t}\n\n" for _, t in messages)


def _apply_template(template: str, messages: list[tuple[str, str]]) -> str:
    import llama_cpp as ll

    keep = [(r.encode(), t.encode()) for r, t in messages]  # alive while llama.cpp reads them
    chat = (ll.llama_chat_message * len(keep))(*[ll.llama_chat_message(r, t) for r, t in keep])
    size = 4 * sum(len(r) + len(t) for r, t in keep) + 1024
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(template.encode(), chat, len(keep), True, buf, size)
        if n < 0:
            raise ValueError("llama.cpp does not recognise this model's chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1  # too small: n is the size needed
    raise AssertionError("unreachable")
