"""Drafters by method name. Each call makes a fresh drafter (fresh state) for a backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from racer_local.drafters.base import Drafter
from racer_local.drafters.pld import PromptLookup

if TYPE_CHECKING:  # the backend loads llama.cpp; `racer-local --help` should not
    from racer_local.backend import Backend


def _racer(**options) -> Callable[[Backend], Drafter]:
    def make(backend: Backend) -> Drafter:
        from racer_local import costmodel
        from racer_local.drafters.racer import Racer

        return Racer(costmodel.cached(backend), **options)

    return make


DRAFTERS: dict[str, Callable[[Backend], Drafter]] = {
    "racer": _racer(),
    "racer-retrieval": _racer(logits=False),
    "racer-logits": _racer(retrieval=False),
    "pld": lambda backend: PromptLookup(),
    "ar": lambda backend: Drafter(),
}


def make_drafter(method: str, backend: Backend) -> Drafter:
    try:
        make = DRAFTERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(DRAFTERS)}") from None
    return make(backend)
