"""The public API: an Engine owns one model and turns prompts into streamed text and stats.

Data flows one way: prompt -> tokens -> prefill (reusing the cached common prefix) ->
decode.speculate -> text.TextStream -> Chunk records. `generate` is `stream` collected.
One engine runs one generation at a time; a second concurrent call raises EngineBusyError.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from racer_local.backend import Backend
from racer_local.decode import speculate
from racer_local.drafters import make_drafter
from racer_local.errors import ContextFullError, DecodeError, RacerError
from racer_local.models import resolve_model
from racer_local.sampling import Sampler
from racer_local.stats import Stats
from racer_local.text import TextStream


class EngineBusyError(RacerError):
    """The engine is already generating (from another thread or an unfinished stream)."""


@dataclass
class Chunk:
    """A piece of streamed output; the last chunk of a stream carries stats and finish_reason."""

    text: str
    tokens: list[int] = field(default_factory=list)
    stats: Stats | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"


@dataclass
class Completion:
    text: str
    tokens: list[int]
    stats: Stats
    finish_reason: str


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        threads: int | None = None,
    ) -> None:
        self.model_path = resolve_model(model)
        self.backend = Backend(self.model_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers)
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._cached: list[int] = []  # the tokens sequence 0 of the KV cache holds

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cancel(self) -> None:
        """Stop the running generation soon (safe from any thread); it ends 'cancelled'."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the KV cache, so the next prompt is evaluated from scratch."""
        with self._exclusive():
            self.backend.clear()
            self._cached = []

    def tokenize(self, prompt: str) -> list[int]:
        return self.backend.tokenize(prompt)

    def generate(self, prompt: str | Sequence[int], **options) -> Completion:
        text, tokens = [], []
        for chunk in self.stream(prompt, **options):
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
        return Completion("".join(text), tokens, chunk.stats, chunk.finish_reason)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        method: str = "racer",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Chunk]:
        """Generate from `prompt` (text, or token ids) and yield text as it becomes final."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.backend.n_ctx:
            raise ContextFullError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.backend.n_ctx}; "
                "shorten the prompt or raise n_ctx"
            )
        drafter = make_drafter(method, self.backend)
        choose = Sampler(temperature, top_k, top_p, min_p, seed)
        text = TextStream(stop)
        return self._run(tokens, drafter, choose, text, max_tokens)

    def _run(self, tokens, drafter, choose, text, max_tokens) -> Iterator[Chunk]:
        with self._exclusive():
            self._cancel.clear()
            stats = Stats(prompt_tokens=len(tokens))
            t0 = time.perf_counter()
            try:
                rows = self._prefill(tokens, drafter.prefill_rows)
            except DecodeError as e:
                if not e.cancelled:
                    raise
                yield Chunk("", stats=stats, finish_reason="cancelled")
                return
            drafter.begin(tokens, rows)
            root = choose(rows[-1])
            stats.prefill_s = time.perf_counter() - t0
            steps = speculate(self.backend, drafter, choose, root, len(tokens), max_tokens)
            finish = "length"
            try:
                while finish == "length":
                    t = time.perf_counter()  # decode time excludes what the consumer does
                    step = next(steps, None)
                    stats.decode_s += time.perf_counter() - t
                    if step is None:
                        break
                    self._cached.extend(step.tokens)
                    stats.steps += 1
                    stats.generated_tokens += len(step.tokens)
                    stats.drafted += step.drafted
                    stats.accepted += len(step.tokens) - 1
                    visible = step.tokens[:-1] if step.eog else step.tokens
                    piece = text.feed(b"".join(self.backend.piece(t) for t in visible))
                    if step.eog or text.stopped:
                        finish = "stop"
                    elif self._cancel.is_set():
                        finish = "cancelled"
                    yield Chunk(piece, step.tokens)
            finally:
                steps.close()  # rolls the KV cache back to what was committed
            yield Chunk(text.flush(), stats=stats, finish_reason=finish)

    def _prefill(self, tokens: list[int], n_logits: int):
        """Decode the part of `tokens` not already cached; roll back on failure."""
        keep = 0
        limit = min(len(self._cached), len(tokens) - 1)  # at least one token must be decoded
        while keep < limit and self._cached[keep] == tokens[keep]:
            keep += 1
        self.backend.seq_rm(0, keep, -1)
        self._cached = tokens[:keep]
        try:
            rows = self.backend.prefill(tokens[keep:], keep, n_logits=n_logits, interrupt=self._cancel)
        except BaseException:
            self.backend.seq_rm(0, keep, -1)
            raise
        self._cached = list(tokens)
        return rows

    @contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError("this engine is already generating; wait for it or use another engine")
        try:
            yield
        finally:
            self._busy.release()
