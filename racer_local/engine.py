"""The public API: an Engine owns one model and turns prompts or chats into streamed text and stats.

Data flows one way: prompt (or messages -> templates) -> tokens -> prefill (reusing the cached
common prefix) -> decode.speculate -> text.TextStream -> Chunk records. `generate` is `stream`
collected, `chat` is `stream_chat` collected.

Threads: one engine runs one generation at a time; a second concurrent call raises
EngineBusyError instead of waiting. `cancel()` may be called from any thread (an app's Stop
button): every stream requested and not finished (the running one, or one not started yet)
ends after its current forward pass with finish_reason "cancelled"; the engine stays usable.

Chat sessions: the caller passes the whole conversation each time (OpenAI style). Turns reuse
the KV cache of the previous ones (only the tokens after the longest common prefix are
evaluated), and each method's drafter is kept across turns until reset().

Context full: `stream` refuses a prompt that does not fit. `stream_chat` needs room for the
conversation plus max_tokens of reply; if it lacks it, it raises ContextFullError, or with
truncate="oldest" drops the oldest turns (never the system messages or the last user message)
until it fits.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from racer_local import costmodel, defaults, templates, topk
from racer_local.backend import Backend
from racer_local.decode import speculate, start
from racer_local.drafters import make_drafter
from racer_local.drafters.base import Drafter
from racer_local.drafters.racer import RacerConfig
from racer_local.errors import ContextFullError, DecodeError, RacerError
from racer_local.models import resolve_model
from racer_local.sampling import Replay, Sampler
from racer_local.stats import Stats
from racer_local.text import TextStream

TRUNCATE = (None, "oldest")
_SAMPLER = {f.name: f.default for f in fields(Sampler) if f.init}


class EngineBusyError(RacerError):
    """The engine is already generating (from another thread or an unfinished stream)."""


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. Every method samples identically; the defaults are greedy decoding."""

    max_tokens: int = defaults.MAX_TOKENS
    method: str = defaults.METHOD  # a drafter name (racer_local.drafters.DRAFTERS); "ar" is plain decoding
    # Sampling: the sampler's own defaults (greedy), documented there. Same seed, same output
    # from a freshly loaded model (README, limits: a used one's trees differ, and with them the
    # batch shapes whose logits llama.cpp computes slightly differently).
    temperature: float = _SAMPLER["temperature"]
    top_k: int = _SAMPLER["top_k"]
    top_p: float = _SAMPLER["top_p"]
    min_p: float = _SAMPLER["min_p"]
    repeat_penalty: float = _SAMPLER["repeat_penalty"]
    frequency_penalty: float = _SAMPLER["frequency_penalty"]
    presence_penalty: float = _SAMPLER["presence_penalty"]
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = _SAMPLER["logit_bias"]
    repeat_last_n: int = _SAMPLER["repeat_last_n"]
    seed: int | None = _SAMPLER["seed"]
    stop: Sequence[str] = ()  # strings that end the generation (not included in the text)
    # Text the output will likely repeat (OpenAI's predicted outputs: the file being edited, say),
    # or its token ids: drafts copy from it; the output stays the model's own.
    prediction: str | Sequence[int] | None = None
    # Commit these tokens instead of the model's choices, drafts verified against them (the
    # bench's same-text mode; sampling.Replay). Greedy only.
    replay: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if isinstance(self.stop, str):  # one stop string, not one per character
            object.__setattr__(self, "stop", (self.stop,))
        if self.replay is not None and self.temperature != 0:
            raise ValueError("replay pins the text: it cannot be combined with temperature > 0")

    def sampler(self, context: Sequence[int]) -> Sampler | Replay:
        if self.replay is not None:
            return Replay(self.replay)
        fields = asdict(self)
        for name in ("max_tokens", "method", "stop", "prediction", "replay"):
            del fields[name]
        return Sampler(**fields, context=context)


@dataclass
class Chunk:
    """A piece of streamed output; the last chunk of a stream carries stats and finish_reason."""

    text: str
    tokens: list[int] = field(default_factory=list)
    stats: Stats | None = None
    finish_reason: str | None = None  # "stop" (end of generation or stop string), "length", "cancelled"


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
        n_ctx: int = defaults.N_CTX,
        n_gpu_layers: int = 0,
        threads: int | None = None,
        rpc: str | Sequence[str] = (),
        candidates: str = defaults.CANDIDATES,
        output_layer: str = defaults.OUTPUT_LAYER,
    ) -> None:
        """Load `model`: a .gguf path, a name from models.toml, or None for the embedded model.
        n_gpu_layers offloads layers to a GPU build of llama.cpp (-1: all); 0 is CPU only.
        rpc: "HOST:PORT" of `racer-local rpc-worker`s (a list, or comma-separated) that take the
        model's layers, the output layer staying here (see rpc.py).
        candidates: where greedy verification takes each node's top-k, "backend" (inside
        llama.cpp's graph: only k tokens a node reach the host), "host" (from full logits rows)
        or "auto" (whichever measured faster here; sampling always reads full rows).
        output_layer: who computes the logits of a tree's rows, "native" (racer-local's own, on a
        CPU with AVX-512 VNNI and a q8_0 output matrix: output_layer.py), "llama.cpp", or "auto"
        (native where it can serve and measured faster here)."""
        self.candidates = candidates  # checked before the model loads
        self.model_path = resolve_model(model)
        self.backend = Backend(self.model_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
                               rpc=rpc, output_layer=output_layer)
        if output_layer == "auto" and self.backend.output_layer == "native":
            costmodel.native_output_pays(self.backend)  # leaves the backend on the faster layer
        self._busy = threading.Lock()
        self._streams = weakref.WeakSet()  # the cancel flags of streams requested, not finished
        self._streams_lock = threading.Lock()
        self._cached: list[int] = []  # the tokens sequence 0 of the KV cache holds
        self._session: dict[tuple[str, bool], Drafter] = {}  # chat drafters by (method, greedy), kept
        self._format: templates.ChatFormat | None = None

    def close(self) -> None:
        self.backend.close()

    @property
    def candidates(self) -> str:
        return self._candidates

    @candidates.setter
    def candidates(self, where: str) -> None:
        if where not in topk.WHERE:
            raise ValueError(f"candidates must be one of {', '.join(topk.WHERE)}, got {where!r}")
        self._candidates = where

    def top_k(self, needs_full_rows: bool) -> int:
        """The rows a generation reads (0: full rows, to sample or penalise), else each node's
        top k where that is faster: the copy-logit table's k, so one mode serves every method."""
        k = RacerConfig.top_k
        if needs_full_rows or self.candidates == "host":
            return 0
        if self.candidates == "auto" and not costmodel.top_k_pays(self.backend, k):
            return 0
        return k

    def read_rows(self, needs_full_rows: bool) -> None:
        """Set the rows the next generation reads: full ones to sample or penalise, else each
        node's top k, from llama.cpp's graph where top_k() says so, and from racer-local's
        output layer wherever that computes a batch (its kernel keeps them as it goes)."""
        self.backend.set_top_k(self.top_k(needs_full_rows))
        self.backend.native_top_k = 0 if needs_full_rows else RacerConfig.top_k

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    default_method = GenerationOptions.method  # what a request that names no method gets

    # ----- OpenAI-shaped requests (the same code as `racer-local serve`) ----------------------

    def create_chat_completion(self, **body):
        """An OpenAI chat completion from keyword fields (messages=..., max_tokens=..., stream=...):
        the response dict, or an iterator of chunk dicts with stream=True; see openai_api.py."""
        from racer_local import openai_api

        return openai_api.chat_completion(self, body)

    def create_completion(self, **body):
        """An OpenAI text completion (prompt=...), like create_chat_completion."""
        from racer_local import openai_api

        return openai_api.completion(self, body)

    def cancel(self) -> None:
        """Stop every stream requested and not finished, running or not started yet, after its
        current forward pass (safe from any thread); each ends with finish_reason "cancelled".
        Streams requested afterwards are not affected."""
        with self._streams_lock:
            flags = list(self._streams)
        for flag in flags:
            flag.set()

    def _cancel_flag(self) -> threading.Event:
        flag = threading.Event()
        with self._streams_lock:
            self._streams.add(flag)
        return flag

    def reset(self) -> None:
        """Forget the KV cache and the chat session's drafter state: the next request starts cold."""
        with self._exclusive():
            self.backend.clear()
            self._cached = []
            self._session.clear()

    def tokenize(self, prompt: str) -> list[int]:
        return self.backend.tokenize(prompt)

    def chat_tokens(self, messages: Sequence[Mapping]) -> list[int]:
        """The prompt token ids `chat` sends for OpenAI-style `messages` (the chat format, one BOS)."""
        return self._tokenize_chat(self.chat_format.render(templates.normalize(messages)))

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds (the conversation so far, for a chat)."""
        return len(self._cached)

    def session_drafter(self, method: str, greedy: bool = True) -> Drafter | None:
        """The chat session's drafter for `method` and mode, if a chat has made one."""
        return self._session.get((method, greedy))

    @property
    def chat_format(self) -> templates.ChatFormat:
        """How chat messages become prompt text for this model (see templates.py). Assign a
        name ("auto", "gguf", "gemma", "plain") to choose another."""
        if self._format is None:
            self._format = templates.for_backend(self.backend)
        return self._format

    @chat_format.setter
    def chat_format(self, name: str) -> None:
        self._format = templates.for_backend(self.backend, name)

    # ----- plain prompts ----------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **options) -> Completion:
        """`stream` collected into one Completion. Options: see GenerationOptions."""
        return _collect(self.stream(prompt, **options))

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[Chunk]:
        """Continue `prompt` (text, or token ids), yielding text as it becomes final (UTF-8 safe,
        stop strings held back); the last chunk carries the stats. Options: see GenerationOptions."""
        cancelled = self._cancel_flag()  # from here on, cancel() stops this stream
        opts = GenerationOptions(**options)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.backend.n_ctx:
            raise ContextFullError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.backend.n_ctx}; "
                "shorten the prompt or raise n_ctx"
            )
        def drafter() -> Drafter:  # made under the engine's lock: a first racer measures the cost curve
            return make_drafter(opts.method, self.backend, greedy=opts.temperature == 0)

        return self._run(tokens, opts, drafter, cancelled)

    # ----- chat -------------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping], *, truncate: str | None = None, **options) -> Completion:
        """`stream_chat` collected into one Completion."""
        return _collect(self.stream_chat(messages, truncate=truncate, **options))

    def stream_chat(
        self, messages: Sequence[Mapping], *, truncate: str | None = None, **options
    ) -> Iterator[Chunk]:
        """Stream the assistant's reply to OpenAI-style `messages` (the whole conversation so far).

        The conversation plus max_tokens must fit in the context: if not, ContextFullError, or
        with truncate="oldest" the oldest turns are dropped until it fits. Options: see
        GenerationOptions.
        """
        cancelled = self._cancel_flag()
        if truncate not in TRUNCATE:
            raise ValueError(f"truncate must be None or 'oldest', got {truncate!r}")
        opts = GenerationOptions(**options)
        fmt = self.chat_format
        tokens = self._chat_tokens(templates.normalize(messages), fmt, opts.max_tokens, truncate)
        stop_tokens = set()
        for text in fmt.stop_tokens:
            ids = self.backend.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1:
                stop_tokens.add(ids[0])
        mode = (opts.method, opts.temperature == 0)

        def drafter() -> Drafter:  # the session's, made under the engine's lock on first use
            if mode not in self._session:
                self._session[mode] = make_drafter(opts.method, self.backend, keep_state=True,
                                                   greedy=opts.temperature == 0)
            return self._session[mode]

        return self._run(tokens, replace(opts, stop=(*opts.stop, *fmt.stop)), drafter, cancelled, stop_tokens)

    def _chat_tokens(self, messages, fmt, max_tokens: int, truncate: str | None) -> list[int]:
        n_ctx = self.backend.n_ctx
        room = n_ctx - max_tokens
        if room < 1:
            raise ContextFullError(
                f"max_tokens={max_tokens} leaves no room for the conversation in a context of "
                f"{n_ctx} tokens; lower max_tokens or raise n_ctx"
            )
        while True:
            tokens = self._tokenize_chat(fmt.render(messages))
            if len(tokens) <= room:
                return tokens
            shorter = _drop_oldest_turn(messages) if truncate == "oldest" else None
            if shorter is None:
                what = "the system prompt and the last message" if truncate else "the conversation"
                hint = ("" if truncate else ", pass truncate='oldest' to drop the oldest turns")
                raise ContextFullError(
                    f"{what} take {len(tokens)} tokens and the reply may take {max_tokens}, but the "
                    f"context holds {n_ctx}; raise n_ctx, lower max_tokens, start a new conversation{hint}"
                )
            messages = shorter

    def _tokenize_chat(self, text: str) -> list[int]:
        tokens = self.backend.tokenize(text, add_special=True, parse_special=True)
        bos = self.backend.bos
        if len(tokens) > 1 and tokens[0] == tokens[1] == bos:  # the template wrote BOS itself
            tokens = tokens[1:]
        return tokens

    # ----- the generation loop ----------------------------------------------------------------

    def _run(self, tokens, opts: GenerationOptions, drafter: Callable[[], Drafter],
             cancelled: threading.Event, stop_tokens=frozenset()) -> Iterator[Chunk]:
        choose = opts.sampler(tokens)  # validates the sampling options now, not at the first next()
        biased = choose.biased if isinstance(choose, Sampler) else []
        if biased and max(biased) >= self.backend.n_vocab:
            raise ValueError(f"logit_bias names token {max(biased)}, but the vocabulary has "
                             f"{self.backend.n_vocab} tokens")
        text = TextStream(opts.stop)
        expected = opts.prediction or ()
        if isinstance(expected, str):
            expected = self.backend.tokenize(expected, add_special=False, parse_special=False)
        expected = [int(t) for t in expected]
        if any(not 0 <= t < self.backend.n_vocab for t in expected):
            raise ValueError("prediction holds token ids outside the vocabulary "
                             f"(0 to {self.backend.n_vocab - 1})")
        return self._steps(tokens, drafter, choose, text, opts.max_tokens, cancelled, stop_tokens, expected)

    def _steps(self, tokens, make, choose, text, max_tokens, cancelled, stop_tokens,
               expected) -> Iterator[Chunk]:
        with self._exclusive(), self._finally_forget(cancelled):
            self.read_rows(choose.needs_full_rows)  # before the drafter's cost curve
            drafter = make()
            stats = Stats(prompt_tokens=len(tokens))
            t0 = time.perf_counter()
            try:
                rows, stats.cached_tokens = self._prefill(tokens, drafter.prefill_rows, cancelled)
            except DecodeError as e:
                if not e.cancelled:
                    raise
                yield Chunk("", stats=stats, finish_reason="cancelled")
                return
            root = start(drafter, choose, tokens, rows)
            if expected:
                drafter.expect(expected)
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
                    self._cached.extend(step.tokens)  # what the KV cache holds
                    piece, kept = self._text(step, text, stop_tokens)
                    if kept is not None:
                        finish = "stop"
                        step = replace(step, tokens=step.tokens[:kept])
                    elif cancelled.is_set():
                        finish = "cancelled"
                    stats.add(step)
                    yield Chunk(piece, step.tokens)
            finally:
                steps.close()  # rolls the KV cache back to what was committed
            yield Chunk(text.flush(), stats=stats, finish_reason=finish)

    def _text(self, step, text: TextStream, stop_tokens) -> tuple[str, int | None]:
        """The step's final text and, if the reply ends in it, how many of its tokens are the
        reply's: up to the one that ended it (end of generation, a stop token, the end of a stop
        string), as plain decoding would commit them; drafts after it are not, nor counted."""
        pieces = []
        for i, token in enumerate(step.tokens):
            if token in stop_tokens or (step.eog and i == len(step.tokens) - 1):
                return "".join(pieces), i + 1
            pieces.append(text.feed(self.backend.piece(token)))
            if text.stopped:
                return "".join(pieces), i + 1
        return "".join(pieces), None

    def _prefill(self, tokens: list[int], n_logits: int, cancelled: threading.Event):
        """Decode the part of `tokens` not already cached; roll back on failure. Returns the
        last n_logits rows and how many tokens the cache already held."""
        keep = 0
        limit = min(len(self._cached), len(tokens) - 1)  # at least one token must be decoded
        while keep < limit and self._cached[keep] == tokens[keep]:
            keep += 1
        self.backend.seq_rm(0, keep, -1)
        self._cached = tokens[:keep]
        try:
            rows = self.backend.prefill(tokens[keep:], keep, n_logits=n_logits, interrupt=cancelled)
        except BaseException:
            self.backend.seq_rm(0, keep, -1)
            raise
        self._cached = list(tokens)
        return rows, keep

    @contextmanager
    def _finally_forget(self, flag: threading.Event):
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams.discard(flag)

    @contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError("this engine is already generating; wait for it or use another engine")
        try:
            yield
        finally:
            self._busy.release()


def _collect(chunks: Iterator[Chunk]) -> Completion:
    text, tokens = [], []
    for chunk in chunks:
        text.append(chunk.text)
        tokens.extend(chunk.tokens)
    return Completion("".join(text), tokens, chunk.stats, chunk.finish_reason)


def _drop_oldest_turn(messages: list[templates.Message]) -> list[templates.Message] | None:
    """Without the first non-system message and the replies that follow it; None if only the
    system messages and the last user message are left."""
    first = next(i for i, (role, _) in enumerate(messages) if role != "system")
    end = first + 1
    while end < len(messages) and messages[end][0] != "user":
        end += 1
    if end >= len(messages):  # `first` is the last user message
        return None
    return messages[:first] + messages[end:]
