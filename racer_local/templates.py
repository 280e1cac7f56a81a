"""Chat messages to prompt text, in the format the model was trained on.

The model's own template (GGUF `tokenizer.chat_template`) when llama.cpp recognises it, through
llama.cpp's built-in formats; else Gemma's turn format for instruction-tuned gemma models
without a template; else a plain "User:/Assistant:" transcript. Base models get the plain
one: the embedded gemma-3-270m (base, no template) answers "The capital of France is Paris."
in a transcript but loops on its own question in Gemma turns, which it was never tuned on.
Messages are OpenAI-style dicts, {"role": "system" | "user" | "assistant", "content": text};
content may also be a list of {"type": "text", "text": ...} parts.

Left out: Jinja rendering of templates llama.cpp does not recognise, tools, images.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from racer_local.backend import Backend

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
Message = tuple[str, str]  # (role, content), normalised


@dataclass(frozen=True)
class ChatFormat:
    name: str  # "gguf" (the model's template through llama.cpp), "gemma" or "plain"
    render: Callable[[Sequence[Message]], str]  # messages -> prompt text, ending with the reply's opening
    stop: tuple[str, ...] = ()  # stop strings a reply needs in this format
    stop_tokens: tuple[str, ...] = ()  # special tokens that end a reply besides the model's end-of-generation


def normalize(messages: Iterable[Mapping]) -> list[Message]:
    """Check OpenAI-style messages and return (role, content) pairs; raise ValueError if unusable."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = ROLES.get(m["role"])
        if role is None:
            raise ValueError(f"message {i} has role {m['role']!r}; use one of: system, user, assistant")
        out.append((role, _text(m["content"], i)))
    if not out:
        raise ValueError("there are no messages")
    if out[-1][0] != "user":
        raise ValueError("the last message must have role 'user'")
    return out


def _text(content, i: int) -> str:
    text = text_of(content)
    if text is None:
        raise ValueError(f"message {i}: content must be a string or a list of text parts")
    return text


def text_of(content) -> str | None:
    """OpenAI content, a string or a list of {"type": "text"} parts, as one string; None if it
    is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def render_gemma(messages: Sequence[Message]) -> str:
    """Gemma's turns, as llama.cpp's built-in "gemma" format writes them: no system role, so
    system text opens the next user turn; contents trimmed; the model's turn left open."""
    out, system = [], ""
    for role, content in messages:
        if role == "system":
            system += content.strip()
            continue
        who = "model" if role == "assistant" else "user"
        out.append(f"<start_of_turn>{who}\n")
        if system and who == "user":
            out.append(system + "\n\n")
            system = ""
        out.append(content.strip() + "<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def render_plain(messages: Sequence[Message]) -> str:
    """A transcript any model can continue; the reply ends where the model starts a new line
    with "User:" or "Assistant:"."""
    out = []
    for role, content in messages:
        if role == "system":
            out.append(content.strip() + "\n\n")
        else:
            out.append(f"{'User' if role == 'user' else 'Assistant'}: {content.strip()}\n")
    out.append("Assistant:")
    return "".join(out)


GEMMA = ChatFormat("gemma", render_gemma, stop_tokens=("<start_of_turn>",))
PLAIN = ChatFormat("plain", render_plain, stop=("\nUser:", "\nAssistant:"))
NAMES = ("auto", "gguf", "gemma", "plain")


def for_backend(backend: Backend, name: str = "auto") -> ChatFormat:
    """The format called `name` for this model; "auto" picks as the module docstring says."""
    if name not in NAMES:
        raise ValueError(f"unknown chat format {name!r}; choose one of: {', '.join(NAMES)}")
    template = backend.chat_template
    if name in ("auto", "gguf") and template:
        if backend.apply_chat_template([("user", "hi")], template) is not None:
            return ChatFormat("gguf", lambda messages: backend.apply_chat_template(messages, template))
    if name == "gguf":
        raise ValueError("this model has no chat template that llama.cpp recognises")
    if name == "gemma" or (name == "auto" and _instruction_tuned_gemma(backend)):
        return GEMMA
    return PLAIN


def _instruction_tuned_gemma(backend: Backend) -> bool:
    if not (backend.meta("general.architecture") or "").startswith("gemma"):
        return False
    words = " ".join(filter(None, (backend.meta("general.finetune"), backend.meta("general.name"))))
    return re.search(r"\b(it|instruct|chat)\b", words.lower()) is not None
