"""Drafters by method name. Each call makes a fresh drafter (fresh state)."""

from __future__ import annotations

from collections.abc import Callable

from racer_local.drafters.base import Drafter
from racer_local.drafters.pld import PromptLookup

DRAFTERS: dict[str, Callable[[], Drafter]] = {
    "ar": Drafter,
    "pld": PromptLookup,
}


def make_drafter(method: str) -> Drafter:
    try:
        return DRAFTERS[method]()
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; choose one of: {', '.join(DRAFTERS)}"
        ) from None
