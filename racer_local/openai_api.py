"""OpenAI-shaped requests and responses, shared by `racer-local serve` and the Python API.

`chat_completion(engine, body)` and `completion(engine, body)` take a request body as the
OpenAI API defines it (a dict) and return the response dict, or with `"stream": true` an
iterator of chunk dicts. Bad requests raise RequestError, which names the field and the
problem; the server turns it into a 400 with an OpenAI error body. Unknown fields are
ignored (clients send many); fields that would change the output and that racer-local
cannot honour (n > 1, logprobs, tools, functions, a response_format other than text) are refused.

Every response carries `timings` under llama-server's names plus racer's own (`steps`,
`tokens_per_step`, `method`); every streamed content chunk carries `racer.step_tokens`, the
tokens its forward pass committed: all but the first of them were accepted drafts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from racer_local.drafters import DRAFTERS
from racer_local.errors import ContextFullError
from racer_local.stats import Stats
from racer_local.templates import text_of

MAX_STOP = 4  # OpenAI's limit on stop strings


class RequestError(ValueError):
    """A request the API refuses: `param` is the offending field, `code` an OpenAI-style code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


def model_id(engine) -> str:
    return Path(engine.model_path).name.removesuffix(".gguf")


def models(engine) -> dict:
    return {"object": "list", "data": [{"id": model_id(engine), "object": "model", "created": 0,
                                        "owned_by": "racer-local"}]}


def timings(stats: Stats, method: str) -> dict:
    """llama-server's timing names (prompt_n: prompt tokens evaluated, cache_n: reused from the KV
    cache), plus racer's steps and tokens per step."""
    return {"cache_n": stats.cached_tokens, "prompt_n": stats.prompt_tokens - stats.cached_tokens,
            "prompt_ms": stats.prefill_s * 1e3,
            "predicted_n": stats.generated_tokens, "predicted_ms": stats.decode_s * 1e3,
            "predicted_per_second": stats.tokens_per_s, "draft_n": stats.drafted,
            "draft_n_accepted": stats.accepted, "steps": stats.steps,
            "tokens_per_step": stats.tokens_per_step, "method": method}


def usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


# ----- requests -----------------------------------------------------------------------------


def _number(body: Mapping, name: str, kind, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           name)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return value


def options(engine, body: Mapping, prompt_tokens: int) -> dict:
    """Engine generation options from an OpenAI request body, validated."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    if (_number(body, "n", int, 1) or 1) != 1:
        raise RequestError("'n' must be 1: one choice per request", "n", "unsupported_parameter")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "response_format"):
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise RequestError(f"'{name}' is not supported by racer-local", name, "unsupported_parameter")
    n_ctx = engine.backend.n_ctx
    room = n_ctx - prompt_tokens
    if room < 1:
        raise RequestError(f"the prompt has {prompt_tokens} tokens but the context holds {n_ctx}; "
                           "shorten it or start the server with a larger --n-ctx", "messages",
                           "context_length_exceeded")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"max_tokens={max_tokens} does not fit: the prompt has {prompt_tokens} tokens "
                           f"and the context holds {n_ctx}, so at most {room} can be generated",
                           "max_tokens", "context_length_exceeded")
    method = body.get("method", engine.default_method)
    if method not in DRAFTERS:
        raise RequestError(f"unknown method {method!r}; choose one of: {', '.join(DRAFTERS)}", "method")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    opts = {"max_tokens": max_tokens or room, "method": method, "stop": tuple(stop)}
    for name, kind, lo, hi in (("temperature", float, 0.0, 2.0), ("top_p", float, 0.0, 1.0),
                               ("top_k", int, 0, None), ("min_p", float, 0.0, 1.0),
                               ("repeat_penalty", float, 0.0, None), ("frequency_penalty", float, -2.0, 2.0),
                               ("presence_penalty", float, -2.0, 2.0), ("seed", int, None, None)):
        value = _number(body, name, kind, lo, hi)
        if value is not None:
            opts[name] = value
    prediction = _prediction(body.get("prediction"))
    if prediction:
        opts["prediction"] = prediction
    bias = _logit_bias(body.get("logit_bias"), engine.backend.n_vocab)
    if bias:
        opts["logit_bias"] = bias
    if opts.get("top_p") == 0.0:
        raise RequestError("'top_p' must be above 0", "top_p")
    if opts.get("repeat_penalty") == 0.0:
        raise RequestError("'repeat_penalty' must be above 0 (1.0 is off)", "repeat_penalty")
    return opts


def _prediction(value) -> str:
    """OpenAI's predicted output, {"type": "content", "content": text or text parts}: drafts
    copy from it (engine.GenerationOptions.prediction)."""
    if value is None:
        return ""
    content = value.get("content") if isinstance(value, Mapping) and value.get("type") == "content" else None
    content = text_of(content)
    if content is None:
        raise RequestError("'prediction' must be {\"type\": \"content\", \"content\": a string or a list of "
                           "text parts}", "prediction")
    return content


def _logit_bias(value, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias from -100 to 100}, as (token, bias) pairs."""
    if value is None:
        return ()
    problem = "'logit_bias' must map token ids (strings of integers) to numbers from -100 to 100"
    if not isinstance(value, Mapping):
        raise RequestError(problem, "logit_bias")
    pairs = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"{problem}, got the key {key!r}", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise RequestError(f"'logit_bias' names token {token}, but the model's vocabulary has "
                               f"{n_vocab} tokens (ids 0 to {n_vocab - 1})", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError(f"{problem}, got {bias!r} for token {token}", "logit_bias")
        pairs.append((token, float(bias)))
    return tuple(pairs)


def _messages(body: Mapping) -> list[dict]:
    messages = body.get("messages") if isinstance(body, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    return messages


def _prompt(body: Mapping) -> str:
    prompt = body.get("prompt") if isinstance(body, Mapping) else None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("'prompt' must be a non-empty string", "prompt")
    return prompt


def _include_usage(body: Mapping) -> bool:
    so = body.get("stream_options")
    return isinstance(so, Mapping) and bool(so.get("include_usage"))


# ----- responses ----------------------------------------------------------------------------


def chat_completion(engine, body: Mapping) -> dict | Iterator[dict]:
    """POST /v1/chat/completions: the response dict, or chunk dicts when body["stream"]."""
    messages = _messages(body)
    try:
        prompt_tokens = len(engine.chat_tokens(messages))
    except ValueError as e:
        raise RequestError(str(e), "messages") from e
    opts = options(engine, body, prompt_tokens)
    chunks = _guard(lambda: engine.stream_chat(messages, **opts))
    return _respond(engine, body, chunks, opts["method"], chat=True)


def completion(engine, body: Mapping) -> dict | Iterator[dict]:
    """POST /v1/completions: the response dict, or chunk dicts when body["stream"]."""
    prompt = _prompt(body)
    opts = options(engine, body, len(engine.tokenize(prompt)))
    chunks = _guard(lambda: engine.stream(prompt, **opts))
    return _respond(engine, body, chunks, opts["method"], chat=False)


def _guard(start):
    try:
        return start()
    except ContextFullError as e:
        raise RequestError(str(e), "max_tokens", "context_length_exceeded") from e
    except ValueError as e:  # invalid options the engine caught (and the message names)
        raise RequestError(str(e)) from e


def _respond(engine, body, chunks, method: str, *, chat: bool):
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": model_id(engine)}
    if body.get("stream"):
        return _stream(head, chunks, method, chat, _include_usage(body))
    text = []
    for chunk in chunks:
        text.append(chunk.text)
    stats, finish = chunk.stats, chunk.finish_reason
    out = "".join(text)
    choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish}
              if chat else {"index": 0, "text": out, "logprobs": None, "finish_reason": finish})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(stats), "timings": timings(stats, method)}


def _stream(head, chunks, method, chat, include_usage) -> Iterator[dict]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def piece(text: str | None, finish=None, step_tokens: int | None = None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if step_tokens == 0:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {**head, "object": kind, "choices": [choice]}
        if step_tokens:
            out["racer"] = {"step_tokens": step_tokens}
        return out

    if chat:
        yield piece(None, step_tokens=0)
    for chunk in chunks:
        if chunk.stats is None:
            if chunk.text or chunk.tokens:
                yield piece(chunk.text, step_tokens=len(chunk.tokens))
            continue
        if chunk.text:
            yield piece(chunk.text)
        last = piece(None, chunk.finish_reason)
        last["timings"] = timings(chunk.stats, method)
        if not include_usage:
            last["usage"] = usage(chunk.stats)
        yield last
        if include_usage:
            yield {**head, "object": kind, "choices": [], "usage": usage(chunk.stats),
                   "timings": timings(chunk.stats, method)}
