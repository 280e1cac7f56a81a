"""Drafters by method name. Each call makes a fresh drafter for a backend; `keep_state=True`
asks for one that carries its context index across the requests of a session (chat), and
`greedy` says which calibration (greedy or sampled acceptance) a RACER drafter starts from."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from racer_local.drafters.base import Drafter
from racer_local.drafters.pld import PromptLookup

if TYPE_CHECKING:  # the backend loads llama.cpp; `racer-local --help` should not
    from racer_local.backend import Backend


def _racer(method: str, **sources) -> Callable[..., Drafter]:
    def make(backend: Backend, keep_state: bool = False, greedy: bool = True) -> Drafter:
        from racer_local import costmodel
        from racer_local.drafters.racer import Racer, RacerConfig, shared_calibration

        return Racer(costmodel.live(backend, method), RacerConfig(**sources), keep_state=keep_state,
                     calibration=shared_calibration(backend, method, greedy), n_vocab=backend.n_vocab)

    return make


DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "racer": _racer("racer"),
    # Ablations: one source at a time.
    "racer-retrieval": _racer("racer-retrieval", logits=False, copy=False),
    "racer-logits": _racer("racer-logits", retrieval=False, copy=False),
    "racer-copy": _racer("racer-copy", retrieval=False, logits=False),
    "pld": lambda backend, keep_state=False, greedy=True: PromptLookup(),  # rebuilt from the context
    "ar": lambda backend, keep_state=False, greedy=True: Drafter(),
}


def make_drafter(method: str, backend: Backend, *, keep_state: bool = False, greedy: bool = True) -> Drafter:
    try:
        make = DRAFTERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(DRAFTERS)}") from None
    return make(backend, keep_state=keep_state, greedy=greedy)
