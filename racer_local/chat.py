"""The terminal chat behind `racer-local chat`: read a line, stream the reply, keep the conversation.

Ctrl-C while a reply streams stops that reply through engine.cancel() (the partial reply is
kept); Ctrl-C at the prompt asks for a second Ctrl-C before quitting. Speedups are measured,
never estimated: /compare regenerates the last reply with plain decoding (`ar`) on the same
prompt and options, and /stats shows the ratio of the two decode speeds once it exists.
Left out: multi-line input, saved histories, markdown rendering.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import click

from racer_local import defaults
from racer_local.engine import Engine
from racer_local.errors import RacerError
from racer_local.stats import Stats

PROMPT = "> "
HELP = """\
/stats [on|off]  the last reply's stats (on/off: print them after every reply)
/compare         regenerate the last reply with plain decoding (ar) and report the speedup
/reset           start a new conversation (keeps the system prompt)
/help            this list
/exit            quit (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while a reply is streaming stops the reply."""


@dataclass
class Reply:
    messages: list[dict]  # what it answered
    text: str
    stats: Stats
    finish_reason: str
    baseline: Stats | None = None  # `ar` on the same messages, once /compare ran


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        *,
        system: str | None = None,
        options: dict | None = None,
        truncate: str | None = "oldest",
        show_stats: bool = False,
        echo: Callable[..., None] = click.echo,
    ) -> None:
        self.engine, self.system, self.truncate = engine, system, truncate
        self.options = dict(options or {})
        self.method = self.options.get("method", defaults.METHOD)
        self.show_stats, self.echo = show_stats, echo
        self.messages: list[dict] = []
        self.last: Reply | None = None
        self.reset_conversation()

    def reset_conversation(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    # ----- the loop ---------------------------------------------------------------------------

    def run(self, read: Callable[[str], str] = input) -> None:
        """Read lines until /exit, end of input, or two Ctrl-C in a row at the prompt."""
        interrupted = False
        while True:
            try:
                line = read(PROMPT)
            except EOFError:
                self.echo("")
                return
            except KeyboardInterrupt:
                if interrupted:
                    self.echo("")
                    return
                self.echo("\n(Ctrl-C again to quit, or /exit)")
                interrupted = True
                continue
            interrupted = False
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.say(line)

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.echo(HELP)
        elif name == "/reset":
            self.engine.reset()
            self.reset_conversation()
            self.echo("(new conversation)")
        elif name == "/stats" and arg in ("on", "off"):
            self.show_stats = arg == "on"
            self.echo(f"(stats after every reply: {arg})")
        elif name == "/stats" and not arg:
            self.print_stats()
        elif name == "/compare":
            self.compare()
        else:
            self.echo(f"unknown command {line!r}; /help lists them")
        return True

    # ----- replies ----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Send a user message and stream the reply."""
        messages = [*self.messages, {"role": "user", "content": text}]
        shown, held = "", ""  # whitespace is held back until text follows it
        try:
            with self._ctrl_c_cancels():
                for chunk in self.engine.stream_chat(messages, truncate=self.truncate, **self.options):
                    text = held + chunk.text
                    if not shown:
                        text = text.lstrip()
                    out = text.rstrip()
                    held = text[len(out):]
                    if out:
                        shown += out
                        self.echo(out, nl=False)
                        sys.stdout.flush()
        except RacerError as e:  # e.g. the context is full; the conversation stays as it was
            self.echo(f"\nError: {e}")
            return
        self.echo("")
        reply = shown
        if chunk.finish_reason == "cancelled":
            self.echo("[stopped]")
        elif chunk.finish_reason == "length":
            self.echo("[cut at the reply length limit: raise it with -n]")
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.last = Reply(messages, reply, chunk.stats, chunk.finish_reason)
        if self.show_stats:
            self.print_stats()

    def compare(self) -> None:
        """Regenerate the last reply with `ar` (not shown, not kept) to measure the speedup."""
        if self.last is None:
            self.echo("(no reply to compare yet)")
            return
        if self.method == "ar":
            self.echo("(this session already uses plain decoding: nothing to compare)")
            return
        self.echo("(regenerating the last reply with plain decoding...)")
        options = {**self.options, "method": "ar"}
        with self._ctrl_c_cancels():
            base = self.engine.chat(self.last.messages, truncate=self.truncate, **options)
        if base.finish_reason == "cancelled":
            self.echo("[stopped]")
            return
        self.last.baseline = base.stats
        self.print_stats()

    def print_stats(self) -> None:
        if self.last is None:
            self.echo("(no reply yet)")
            return
        stats, base = self.last.stats, self.last.baseline
        self.echo(f"[{self.method}] {stats.summary()}")
        if base is not None:
            self.echo(f"[ar] {base.summary()}")
            if base.tokens_per_s:
                speedup = stats.tokens_per_s / base.tokens_per_s
                self.echo(f"speedup over ar: {speedup:.2f}x (decode tokens/s, same prompt)")
        elif self.method != "ar":
            self.echo("speedup: not measured yet; /compare runs plain decoding on this prompt")

    @contextmanager
    def _ctrl_c_cancels(self):
        """While a reply streams, Ctrl-C cancels it instead of raising KeyboardInterrupt."""
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.engine.cancel())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def banner(engine: Engine, method: str) -> str:
    name = engine.model_path.name
    return (f"racer-local chat: {name}, {engine.chat_format.name} chat format, method {method}, "
            f"context {engine.backend.n_ctx} tokens.\n"
            "Type a message, or /help for commands. Ctrl-C stops a reply.")
