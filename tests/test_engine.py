"""The Python API an app embeds: chat formatting, chat sessions (KV reuse, drafter kept, context
policy), cancellation and concurrent use from threads, options, and GPU offload settings.

Pure tests first (message formats, dropping turns); the rest share the embedded-model engine
from conftest.py and keep every generation a few tokens long.
"""

from __future__ import annotations

import threading
import time
import weakref

import llama_cpp
import pytest
from click.testing import CliRunner

import racer_local
import racer_local.engine as engine_module
from racer_local import templates
from racer_local.drafters.base import Drafter
from racer_local.engine import Engine, EngineBusyError, GenerationOptions, _drop_oldest_turn
from racer_local.errors import ContextFullError

CONVERSATION = [
    {"role": "system", "content": "  Be brief. "},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! \n"},
    {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
]


# ----- formats, without a model -------------------------------------------------------------------


def test_the_public_names_are_exported():
    for name in racer_local.__all__:
        assert getattr(racer_local, name) is not None
    assert racer_local.Engine is Engine and racer_local.EngineBusyError is EngineBusyError


def test_messages_are_normalised():
    assert templates.normalize(CONVERSATION) == [("system", "  Be brief. "), ("user", "Hi there"),
                                                 ("assistant", " Hello! \n"), ("user", "What is 2+2?")]
    developer = [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]
    assert templates.normalize(developer)[0] == ("system", "x")


@pytest.mark.parametrize(
    "messages, message",
    [([], "no messages"), ([{"role": "user"}], "'role' and 'content'"),
     ([{"role": "robot", "content": "x"}], "role 'robot'"),
     ([{"role": "user", "content": [{"type": "image_url"}]}], "text parts"),
     ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message")],
)
def test_unusable_messages_are_refused(messages, message):
    with pytest.raises(ValueError, match=message):
        templates.normalize(messages)


def test_gemma_turns():
    text = templates.render_gemma(templates.normalize(CONVERSATION))
    assert text == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_plain_transcript():
    text = templates.render_plain(templates.normalize(CONVERSATION))
    assert text == "Be brief.\n\nUser: Hi there\nAssistant: Hello!\nUser: What is 2+2?\nAssistant:"
    assert templates.PLAIN.stop == ("\nUser:", "\nAssistant:")


def test_dropping_the_oldest_turn_keeps_system_messages_and_the_last_user_message():
    m = [("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
         ("user", "u3")]
    assert _drop_oldest_turn(m) == [("system", "s"), ("user", "u2"), ("assistant", "a2"), ("user", "u3")]
    assert _drop_oldest_turn(_drop_oldest_turn(m)) == [("system", "s"), ("user", "u3")]
    assert _drop_oldest_turn([("system", "s"), ("user", "u3")]) is None
    assert _drop_oldest_turn([("assistant", "hi"), ("user", "u")]) == [("user", "u")]


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationOptions(max_tokens=0)
    with pytest.raises(TypeError, match="temprature"):
        GenerationOptions(temprature=1.0)
    assert GenerationOptions(stop="END").stop == ("END",)
    assert GenerationOptions().sampler([1, 2]).greedy
    with pytest.raises(ValueError, match="replay pins the text"):
        GenerationOptions(replay=[1, 2], temperature=0.8)


def test_replay_commits_the_given_text_and_verifies_drafts_against_it(engine):
    """The bench's same-text mode: the tokens are the replayed ones, not the model's choices,
    and racer's drafts are verified against them (a replayed copy of the prompt: few steps)."""
    line = " one two three four five six seven eight nine ten."
    prompt, forced = line * 2, engine.backend.tokenize(line * 2, add_special=False)
    assert engine.generate(prompt, max_tokens=len(forced), method="ar").tokens != forced
    for method in ("ar", "racer"):
        engine.reset()
        c = engine.generate(prompt, max_tokens=len(forced), method=method, replay=forced)
        assert c.tokens == forced
    assert c.stats.steps < len(forced)


# ----- chat on the real model ---------------------------------------------------------------------


def test_llama_cpp_templates_and_the_formats_chosen(engine):
    b = engine.backend
    pairs = templates.normalize(CONVERSATION)
    # Our Gemma fallback writes exactly what llama.cpp's built-in "gemma" format writes.
    assert b.apply_chat_template(pairs, "gemma") == templates.render_gemma(pairs)
    chatml = b.apply_chat_template(pairs, "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}")
    assert chatml.startswith("<|im_start|>system\n") and chatml.endswith("<|im_start|>assistant\n")
    assert b.apply_chat_template(pairs, "no template llama.cpp knows") is None
    # The embedded model is a base model without a template: it gets the plain transcript.
    assert b.chat_template is None and engine.chat_format.name == "plain"
    try:
        engine.chat_format = "gemma"
        assert engine.chat_format is templates.GEMMA
        with pytest.raises(ValueError, match="no chat template"):
            engine.chat_format = "gguf"
    finally:
        engine.chat_format = "auto"


def _record_prefills(engine, monkeypatch) -> list[tuple[int, int]]:
    calls = []
    real = engine.backend.prefill

    def prefill(tokens, start, **kwargs):
        calls.append((start, len(tokens)))
        return real(tokens, start, **kwargs)

    monkeypatch.setattr(engine.backend, "prefill", prefill)
    return calls


def test_a_chat_turn_reuses_the_kv_cache_of_the_previous_ones(engine, monkeypatch):
    engine.reset()
    calls = _record_prefills(engine, monkeypatch)
    messages = [{"role": "system", "content": "You answer questions."},
                {"role": "user", "content": "What is the capital of France?"}]
    first = engine.chat(messages, max_tokens=8)
    assert calls == [(0, first.stats.prompt_tokens)]
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And the capital of Italy?"}]
    second = engine.chat(messages, max_tokens=4)
    start, n = calls[1]
    assert start >= first.stats.prompt_tokens  # the first turn's prompt was not evaluated again
    assert start + n == second.stats.prompt_tokens


class Recording(Drafter):
    """Plain decoding that remembers how it was made and what it was asked."""

    made: list = []

    def __init__(self, keep_state: bool) -> None:
        self.keep_state, self.contexts = keep_state, []
        Recording.made.append(self)

    def begin(self, context, rows) -> None:
        self.contexts.append(list(context))


def test_a_chat_session_keeps_its_drafter_until_reset(engine, monkeypatch):
    Recording.made = []
    monkeypatch.setattr(engine_module, "make_drafter",
                        lambda method, backend, keep_state=False, **kw: Recording(keep_state))
    engine.reset()
    messages = [{"role": "user", "content": "Say something."}]
    reply = engine.chat(messages, max_tokens=3)
    engine.chat([*messages, {"role": "assistant", "content": reply.text},
                 {"role": "user", "content": "More."}], max_tokens=3)
    assert len(Recording.made) == 1 and Recording.made[0].keep_state
    assert len(Recording.made[0].contexts) == 2
    engine.generate("Plain prompts get a drafter of their own", max_tokens=2)
    assert len(Recording.made) == 2 and not Recording.made[1].keep_state
    engine.chat(messages, max_tokens=2)
    assert len(Recording.made) == 2  # still the session's drafter
    engine.reset()
    engine.chat(messages, max_tokens=2)
    assert len(Recording.made) == 3 and Recording.made[2].keep_state


def _long_conversation(turns: int, words: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: " + "tell me more " * words},
                     {"role": "assistant", "content": f"Answer {i}: " + "more and more " * words}]
    return [*messages, {"role": "user", "content": "Last question?"}]


def test_a_full_context_raises_by_default_and_drops_the_oldest_turns_on_request(engine, monkeypatch):
    messages = _long_conversation(turns=4, words=60)  # about 1,500 tokens; the context holds 1,024
    with pytest.raises(ContextFullError, match="truncate='oldest'"):
        engine.stream_chat(messages, max_tokens=16)
    engine.reset()
    calls = _record_prefills(engine, monkeypatch)
    reply = engine.chat(messages, max_tokens=16, truncate="oldest")
    assert reply.finish_reason in ("stop", "length")
    assert reply.stats.prompt_tokens + 16 <= engine.backend.n_ctx
    assert reply.stats.prompt_tokens > engine.backend.n_ctx // 2  # only as many turns as needed went
    assert calls[0][0] == 0
    with pytest.raises(ContextFullError, match="system prompt and the last message"):
        engine.stream_chat([{"role": "user", "content": "word " * 1200}], max_tokens=16, truncate="oldest")
    with pytest.raises(ContextFullError, match="max_tokens"):
        engine.stream_chat([{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(ValueError, match="truncate"):
        engine.stream_chat([{"role": "user", "content": "hi"}], truncate="newest")


def test_stop_tokens_end_a_reply_before_them(engine):
    engine.reset()
    prompt = "One, two, three, four, five, six"
    free = engine.generate(prompt, max_tokens=6, method="ar")
    stop = free.tokens[3]
    tokens = engine.tokenize(prompt)
    opts = GenerationOptions(max_tokens=6, method="ar")
    chunks = list(engine._run(tokens, opts, Drafter, engine._cancel_flag(), {stop}))
    assert chunks[-1].finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    assert text == engine.backend.detokenize(free.tokens[: free.tokens.index(stop)])


@pytest.mark.parametrize("method", ["pld", "racer"])
def test_a_stop_string_ends_the_reply_where_plain_decoding_would(engine, method, monkeypatch):
    """A step may commit drafts past a stop string; they are not the reply's: its tokens and
    their count (the API's completion_tokens, tokens/s) are what plain decoding gives. Trees are
    sized from the cached curve alone here: what the session's earlier steps taught the online
    refinement (machine noise included) could shrink them to the root and draft nothing past."""
    from racer_local import costmodel

    monkeypatch.setattr(costmodel, "_live", weakref.WeakKeyDictionary())
    monkeypatch.setattr(costmodel.LiveCost, "observe", lambda self, n, seconds: None)
    prompt = "one two three four five one two three four five one two three four five one two"
    plain = engine.generate(prompt, max_tokens=24, method="ar", stop=["five"])
    fast = engine.generate(prompt, max_tokens=24, method=method, stop=["five"])
    assert engine.cached_tokens > len(engine.tokenize(prompt)) + len(fast.tokens)  # drafts went past it
    assert (fast.text, fast.tokens, fast.finish_reason) == (plain.text, plain.tokens, "stop")
    assert fast.stats.generated_tokens == len(fast.tokens)


def test_token_ids_outside_the_vocabulary_are_refused_before_decoding(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate("Hello", max_tokens=4, prediction=[1, engine.backend.n_vocab])
    with pytest.raises(ValueError, match="vocabulary has"):
        engine.generate("Hello", max_tokens=4, logit_bias={engine.backend.n_vocab: -100})


# ----- threads ------------------------------------------------------------------------------------

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def test_cancel_from_another_thread_stops_promptly_and_the_engine_stays_usable(engine):
    engine.reset()
    chunks, first, done = [], threading.Event(), threading.Event()

    def consume():
        for chunk in engine.stream(PROMPT, max_tokens=400, method="racer"):
            chunks.append(chunk)
            first.set()
        done.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(60)
    t = time.perf_counter()
    engine.cancel()
    at_cancel = len(chunks)
    assert done.wait(30)
    worker.join()
    elapsed = time.perf_counter() - t
    assert chunks[-1].finish_reason == "cancelled"
    assert len(chunks) <= at_cancel + 3  # at most the step in flight, one more, and the stats
    assert sum(len(c.tokens) for c in chunks) < 400
    assert elapsed < 10, f"cancel took {elapsed:.1f}s"
    # Usable afterwards, with a KV cache that matches a cold start.
    warm = engine.generate(PROMPT, max_tokens=8, method="ar")
    engine.reset()
    assert warm.tokens == engine.generate(PROMPT, max_tokens=8, method="ar").tokens


def test_cancel_during_the_prefill(engine, monkeypatch):
    engine.reset()
    real = engine.backend.decode

    def decode(tokens, positions, seq_ids=None, **kwargs):
        engine.cancel()  # the Stop button, pressed while the prompt is being read
        return real(tokens, positions, seq_ids, **kwargs)

    monkeypatch.setattr(engine.backend, "decode", decode)
    long_prompt = "The history of the village is long. " * 80  # two prefill batches
    out = engine.generate(long_prompt, max_tokens=8)
    assert out.finish_reason == "cancelled" and out.tokens == []
    monkeypatch.undo()
    assert engine.generate("Hello", max_tokens=2, method="ar").finish_reason in ("length", "stop")


def test_a_cancel_with_nothing_running_does_not_stop_the_next_generation(engine):
    engine.cancel()
    assert engine.generate("Hello", max_tokens=3, method="ar").finish_reason != "cancelled"


def test_a_cancel_before_the_stream_starts_stops_it(engine):
    stream = engine.stream("Hello", max_tokens=3, method="ar")  # requested; no token yet
    engine.cancel()  # e.g. Stop pressed before the worker thread began iterating
    chunks = list(stream)
    assert chunks[-1].finish_reason == "cancelled" and not any(c.tokens for c in chunks)
    assert engine.generate("Hello", max_tokens=3, method="ar").finish_reason != "cancelled"


def test_a_second_thread_gets_engine_busy_not_a_corrupted_cache(engine):
    engine.reset()
    holding, release, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            for _ in engine.stream(PROMPT, max_tokens=6, method="ar"):
                holding.set()
                release.wait(30)
        except Exception as e:  # reported to the main thread
            errors.append(e)

    worker = threading.Thread(target=hold)
    worker.start()
    assert holding.wait(60)
    try:
        with pytest.raises(EngineBusyError):
            engine.generate("Another prompt", max_tokens=2)
        with pytest.raises(EngineBusyError):
            engine.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(EngineBusyError):
            engine.reset()
    finally:
        release.set()
        worker.join()
    assert not errors
    assert engine.generate("Another prompt", max_tokens=2, method="ar").tokens


# ----- GPU offload --------------------------------------------------------------------------------


@pytest.fixture
def model_params(monkeypatch):
    """n_gpu_layers of every model llama.cpp is asked to load."""
    seen = []
    real = llama_cpp.llama_model_load_from_file

    def load(path, params):
        seen.append(params.n_gpu_layers)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", load)
    return seen


def test_n_gpu_layers_reaches_llama_cpp_and_cpu_is_the_default(model_path, model_params):
    with Engine(model_path, n_ctx=256, threads=1, n_gpu_layers=7) as gpu:
        assert gpu.backend.n_gpu_layers == 7
        assert gpu.generate("Hello", max_tokens=2, method="ar").tokens  # a CPU build just runs
    with Engine(model_path, n_ctx=256, threads=1) as cpu:
        assert cpu.backend.n_gpu_layers == 0
    assert model_params == [7, 0]


def test_the_cli_option_reaches_llama_cpp(model_path, model_params, monkeypatch):
    monkeypatch.delenv("RACER_LOCAL_MODEL", raising=False)
    from racer_local.cli import main

    result = CliRunner().invoke(main, ["generate", "Hello", "-m", str(model_path), "--n-gpu-layers", "5",
                                       "-n", "2", "--method", "ar", "--threads", "1", "--n-ctx", "256"])
    assert result.exit_code == 0, result.output
    assert model_params == [5]
