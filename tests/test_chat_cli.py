"""`racer-local chat`: the session logic against a scripted engine, then the real program on the
embedded model through a pseudo-terminal, the way a person uses it (typing, Ctrl-C)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest

from racer_local.chat import ChatSession
from racer_local.engine import Chunk, Completion
from racer_local.errors import ContextFullError
from racer_local.stats import Stats

# ----- the session against a scripted engine ------------------------------------------------------


class ScriptedEngine:
    """Replies with the next scripted text, in two chunks; records what it was asked."""

    def __init__(self, replies, finish="stop"):
        self.replies, self.finish = list(replies), finish
        self.asked, self.resets, self.cancels = [], 0, 0

    def stream_chat(self, messages, truncate=None, **options):
        self.asked.append((list(messages), options))
        text = self.replies.pop(0)
        if isinstance(text, Exception):
            raise text
        stats = Stats(generated_tokens=10, steps=4, decode_s=0.5 if options["method"] == "ar" else 0.25)
        half = len(text) // 2
        return iter([Chunk(text[:half]), Chunk(text[half:], stats=stats, finish_reason=self.finish)])

    def chat(self, messages, truncate=None, **options):
        chunks = list(self.stream_chat(messages, truncate, **options))
        return Completion("".join(c.text for c in chunks), [], chunks[-1].stats, chunks[-1].finish_reason)

    def reset(self):
        self.resets += 1

    def cancel(self):
        self.cancels += 1


def session(engine, **kwargs):
    out: list[str] = []
    s = ChatSession(engine, options={"method": "racer", "max_tokens": 8}, echo=lambda t="", nl=True:
                    out.append(t + ("\n" if nl else "")), **kwargs)
    return s, out


def run(s, lines):
    feed = iter(lines)

    def read(prompt):
        line = next(feed)
        if isinstance(line, BaseException):
            raise line
        return line

    s.run(read)


def test_a_conversation_is_kept_and_sent_whole():
    engine = ScriptedEngine([" Hello there!  \n", "Fine."])
    s, out = session(engine, system="Be brief.")
    run(s, ["Hi", "", "How are you?", EOFError()])
    assert "".join(out).startswith("Hello there!\n")  # leading and trailing whitespace not shown
    messages, options = engine.asked[1]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello there!"},
                        {"role": "user", "content": "How are you?"}]
    assert options == {"method": "racer", "max_tokens": 8}
    assert s.messages[-1] == {"role": "assistant", "content": "Fine."}


def test_reset_keeps_the_system_prompt_and_resets_the_engine():
    engine = ScriptedEngine(["One.", "Two."])
    s, out = session(engine, system="Be brief.")
    run(s, ["Hi", "/reset", "Again", "/exit"])
    assert engine.resets == 1
    assert engine.asked[1][0] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Again"}]
    assert "(new conversation)\n" in out


def test_stats_and_a_measured_speedup():
    engine = ScriptedEngine(["Paris.", "Paris."])
    s, out = session(engine)
    run(s, ["/stats", "Capital of France?", "/stats", "/compare", EOFError()])
    text = "".join(out)
    assert "(no reply yet)" in text
    assert "speedup: not measured yet" in text
    assert engine.asked[1][1]["method"] == "ar" and engine.asked[1][0] == engine.asked[0][0]
    assert "speedup over ar: 2.00x" in text  # 40 tok/s against 20 tok/s
    assert len(s.messages) == 2  # /compare's reply is not part of the conversation


def test_stats_after_every_reply_on_request():
    engine = ScriptedEngine(["A.", "B."])
    s, out = session(engine)
    run(s, ["/stats on", "x", "/stats off", "y", "/exit"])
    assert "".join(out).count("[racer] 10 tokens in 4 steps") == 1


def test_a_stopped_reply_is_kept_and_marked():
    engine = ScriptedEngine(["Once upon a"], finish="cancelled")
    s, out = session(engine)
    run(s, ["Tell me a story", EOFError()])
    assert "[stopped]\n" in out
    assert s.messages[-1] == {"role": "assistant", "content": "Once upon a"}


def test_an_error_leaves_the_conversation_as_it_was():
    engine = ScriptedEngine([ContextFullError("the context is full"), "ok"])
    s, out = session(engine)
    run(s, ["A very long message", "short", EOFError()])
    assert "\nError: the context is full\n" in out
    assert engine.asked[1][0] == [{"role": "user", "content": "short"}]


def test_ctrl_c_at_the_prompt_twice_quits_and_once_does_not():
    engine = ScriptedEngine(["ok"])
    s, out = session(engine)
    run(s, [KeyboardInterrupt(), "hi", KeyboardInterrupt(), KeyboardInterrupt(), "never read"])
    assert "".join(out).count("Ctrl-C again") == 2
    assert len(engine.asked) == 1


def test_unknown_commands_are_named():
    s, out = session(ScriptedEngine([]))
    run(s, ["/frobnicate", "/help", "/quit"])
    assert "unknown command '/frobnicate'" in "".join(out)
    assert "/compare" in "".join(out)


# ----- the real program in a pseudo-terminal ------------------------------------------------------

EXE = str(Path(sys.executable).with_name("racer-local"))
POEM = "Here is a poem, please continue it for many lines: Roses are red, violets are blue,"


@pytest.fixture
def chat(model_path):
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    env.pop("RACER_LOCAL_MODEL", None)  # chat's default model (SmolLM2), whatever the caller set
    # As a terminal would: SIGINT at its default, whatever the test runner inherited (a job
    # started with `&` by a shell without job control ignores it, and so would the chat).
    child = pexpect.spawn(EXE, ["chat", "--threads", "2", "--n-ctx", "2048", "-n", "1500",
                                "-s", "You are a helpful assistant."],
                          env=env, encoding="utf-8", timeout=180, dimensions=(50, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    yield child
    child.close(force=True)


def test_chat_in_a_terminal(chat):
    chat.expect("Type a message")
    chat.expect_exact("> ")
    chat.sendline("What is the capital of France?")
    chat.expect("Paris")  # streamed as it is generated; the chat default model knows this one
    chat.expect_exact("\r\n> ")

    chat.sendline("/stats")
    chat.expect(r"\[racer\] \d+ tokens in \d+ steps \([\d.]+ per step.*\), [\d.]+ tok/s")
    chat.expect("speedup: not measured yet")
    chat.sendline("/compare")
    chat.expect(r"speedup over ar: [\d.]+x")
    chat.expect_exact("\r\n> ")

    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.expect_exact("\r\n> ")
    chat.sendline("/stats")
    chat.expect_exact("(no reply yet)")

    # Ctrl-C while a long reply streams stops the reply, not the program.
    chat.sendline(POEM)
    chat.expect_exact(POEM)  # the terminal's echo of the line typed
    chat.expect(r"\w+ \w+ \w+")  # the reply has begun streaming
    t = time.perf_counter()
    chat.sendintr()
    chat.expect_exact("[stopped]")
    assert time.perf_counter() - t < 15
    chat.expect_exact("\r\n> ")
    chat.sendline("/stats")
    chat.expect(r"\[racer\] (\d+) tokens")
    assert int(chat.match.group(1)) < 1500

    chat.expect_exact("> ")
    chat.sendintr()
    chat.expect("Ctrl-C again to quit")
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_exit_command_and_a_clean_end(chat):
    chat.expect_exact("> ")
    chat.sendline("/help")
    chat.expect("regenerate the last reply")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert not re.search("Traceback", chat.before or "")
