"""Drafters by method name. Each call makes a fresh drafter for a backend; `keep_state=True`
asks for one that carries what it learned across the requests of a session (chat)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from racer_local.drafters.base import Drafter
from racer_local.drafters.pld import PromptLookup

if TYPE_CHECKING:  # the backend loads llama.cpp; `racer-local --help` should not
    from racer_local.backend import Backend


def _racer(**fixed) -> Callable[..., Drafter]:
    def make(backend: Backend, keep_state: bool = False) -> Drafter:
        from racer_local import costmodel
        from racer_local.drafters.racer import Racer

        return Racer(costmodel.cached(backend), keep_state=keep_state, **fixed)

    return make


DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "racer": _racer(),
    "racer-retrieval": _racer(logits=False),
    "racer-logits": _racer(retrieval=False),
    "pld": lambda backend, keep_state=False: PromptLookup(),  # rebuilt from the context anyway
    "ar": lambda backend, keep_state=False: Drafter(),
}


def make_drafter(method: str, backend: Backend, *, keep_state: bool = False) -> Drafter:
    try:
        make = DRAFTERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(DRAFTERS)}") from None
    return make(backend, keep_state=keep_state)
