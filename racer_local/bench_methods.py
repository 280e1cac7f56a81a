"""The methods a bench compares: each turns prompt token ids into one timed Turn.

- every drafter (racer_local.drafters) through the shared Engine;
- llama.cpp's own server, plain (`llama.cpp`) or with one of its speculative modes
  (`llama.cpp-ngram-mod`, ...), built from the binding's source (llama_server_build.py);
- llama-cpp-python's prompt lookup (`llama-cpp-python-pld`).
All stop only at the end of generation or the token limit (no chat stop strings), alike.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from racer_local.drafters import DRAFTERS
from racer_local.stats import Stats

BASELINE = "ar"
LCP_PLD = "llama-cpp-python-pld"
LLAMA_CPP = "llama.cpp"  # llama-server without speculation; "llama.cpp-<type>" with a spec type
RACERS = tuple(m for m in DRAFTERS if m.startswith("racer"))  # racer and its ablations


@dataclass
class Turn:
    """One generation: what a method produced for one prompt text, and how fast."""

    stats: Stats
    tokens: list[int]
    text: str
    finish_reason: str
    prompt: list[int] = field(repr=False)  # prompt token ids, kept for the near-tie check


class EngineMethod:
    """A drafter from racer_local.drafters, run through the shared Engine."""

    def __init__(self, engine, method: str) -> None:
        self.engine, self.method = engine, method

    replays = True  # can be pinned to another run's tokens (the bench's same-text mode)

    def generate(self, prompt: list[int], max_tokens: int, sampling: dict, replay=None) -> Turn:
        self.engine.reset()  # cold prefill for every method alike
        if replay is not None:
            sampling, max_tokens = {**sampling, "replay": replay}, len(replay)
        c = self.engine.generate(prompt, max_tokens=max_tokens, method=self.method, **sampling)
        return Turn(c.stats, c.tokens, c.text, c.finish_reason, prompt)

    def close(self) -> None:
        pass


class LlamaCppPythonPLD:
    """llama-cpp-python's own speculative path: Llama(draft_model=LlamaPromptLookupDecoding).

    Same model file, context, batch and threads as the Engine. Timed like the Engine: prefill
    ends when the first token is known; decode covers the forward passes over the N generated
    tokens, i.e. until the (N+1)-th token is known (that one is not counted).
    """

    def __init__(self, engine, repeat_last_n: int = 64) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        b = self.backend = engine.backend
        self.llm = Llama(str(engine.model_path), n_ctx=b.n_ctx, n_batch=b.n_batch,
                         n_threads=b.n_threads, n_threads_batch=b.n_threads,
                         n_gpu_layers=b.n_gpu_layers, logits_all=True, verbose=False,
                         last_n_tokens_size=repeat_last_n,
                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
        self.evals: list[int] = []  # batch size of every llm.eval call
        real_eval = self.llm.eval

        def counted_eval(tokens):
            self.evals.append(len(tokens))
            return real_eval(tokens)

        self.llm.eval = counted_eval

    def generate(self, prompt: list[int], max_tokens: int, sampling: dict) -> Turn:
        llm, is_eog = self.llm, self.backend.is_eog
        llm.reset()  # n_tokens = 0: the next eval clears the KV cache, a cold prefill
        if sampling.get("seed") is not None:
            llm.set_seed(sampling["seed"])
        self.evals.clear()
        tokens: list[int] = []
        t0 = time.perf_counter()
        gen = llm.generate(prompt, temp=sampling.get("temperature", 0.0),
                           top_k=sampling.get("top_k", 0), top_p=sampling.get("top_p", 1.0),
                           min_p=sampling.get("min_p", 0.0),
                           repeat_penalty=sampling.get("repeat_penalty", 1.0),
                           frequency_penalty=sampling.get("frequency_penalty", 0.0),
                           presence_penalty=sampling.get("presence_penalty", 0.0))
        try:
            token = next(gen)
            t1 = time.perf_counter()
            n_prefill = len(self.evals)
            while True:
                tokens.append(token)
                if is_eog(token) or len(tokens) > max_tokens:
                    break
                token = next(gen)
            t2 = time.perf_counter()
        finally:
            gen.close()
        tokens = tokens[:max_tokens]  # drop the (N+1)-th token, read only to time the N-th
        finish = "stop" if is_eog(tokens[-1]) else "length"
        decoded = self.evals[n_prefill:]
        stats = Stats(prompt_tokens=len(prompt), generated_tokens=len(tokens), prefill_s=t1 - t0,
                      decode_s=t2 - t1, steps=len(decoded), drafted=sum(n - 1 for n in decoded))
        stats.accepted = max(0, stats.generated_tokens - stats.steps)
        text = self.backend.detokenize(tokens[:-1] if finish == "stop" else tokens)
        return Turn(stats, tokens, text, finish, prompt)

    def close(self) -> None:
        self.llm.close()


class Unavailable:
    """Stands in for a method that could not start: every generation reports why."""

    def __init__(self, error: str) -> None:
        self.error = error

    def generate(self, *args, **kwargs) -> Turn:
        raise RuntimeError(self.error)

    def close(self) -> None:
        pass


class LlamaCppServer:
    """llama.cpp's `llama-server` on 127.0.0.1 with the Engine's model, context, threads, batch and
    GPU layers, greedy or sampled like the Engine, no prompt cache.

    Figures are the server's own timings: prefill is `prompt_ms`; `predicted_ms` covers the
    forward passes after the first token (which the prefill gives), so decode time is scaled to
    all `predicted_n` tokens, as racer-local's decode time covers one pass per token for `ar`.
    Steps are tokens minus accepted drafts: each step commits one token plus its accepted ones.
    """

    def __init__(self, engine, spec_type: str | None, binary) -> None:
        from racer_local.llama_server import LlamaServer

        b = self.backend = engine.backend
        self._start = functools.partial(LlamaServer, binary, engine.model_path, n_ctx=b.n_ctx,
                                        threads=b.n_threads, n_batch=b.n_batch,
                                        n_gpu_layers=b.n_gpu_layers, spec_type=spec_type)
        self.server, self._cpu_before = self._start(), 0.0

    def forget(self) -> None:
        """Start again with a fresh server. llama-server keeps some drafters' state across
        requests (ngram-mod's pool holds every text it saw), so a prompt run twice would draft
        its own earlier answer: measured on gemma-3-270m, ngram-mod's tokens per step went from
        2.5 to 5.1 when the bench kept the faster of two runs on one server."""
        self._cpu_before += self.server.cpu_seconds()
        self.server.close()
        self.server = self._start()

    def cpu_seconds(self) -> float:
        """CPU seconds of every server this method started."""
        return self._cpu_before + self.server.cpu_seconds()

    def generate(self, prompt: list[int], max_tokens: int, sampling: dict) -> Turn:
        greedy = sampling.get("temperature", 0.0) == 0
        fields = {"n_predict": max_tokens, "cache_prompt": False, "return_tokens": True,
                  # Greedy with top_k 1, as llama-server users do: the same argmax, without its
                  # sampler chain sorting the whole vocabulary each token (measured: 0.88x `ar`
                  # with top_k 0 on gemma-3-270m, 0.99x with top_k 1).
                  "temperature": sampling.get("temperature", 0.0),
                  "top_k": 1 if greedy else sampling.get("top_k", 0),
                  "top_p": sampling.get("top_p", 1.0), "min_p": sampling.get("min_p", 0.0),
                  "repeat_penalty": sampling.get("repeat_penalty", 1.0),
                  "repeat_last_n": sampling.get("repeat_last_n", 64),
                  "frequency_penalty": sampling.get("frequency_penalty", 0.0),
                  "presence_penalty": sampling.get("presence_penalty", 0.0),
                  "typical_p": 1.0, "xtc_probability": 0.0, "dry_multiplier": 0.0}
        if sampling.get("seed") is not None:
            fields["seed"] = sampling["seed"]
        answer = self.server.complete(prompt, **fields)
        t, tokens = answer["timings"], list(answer.get("tokens") or [])
        n, accepted = t["predicted_n"], t.get("draft_n_accepted", 0)
        finish = "length" if answer.get("stop_type") == "limit" else "stop"  # tokens end with the EOG one
        stats = Stats(prompt_tokens=len(prompt), generated_tokens=n, prefill_s=t["prompt_ms"] / 1e3,
                      decode_s=t["predicted_ms"] / 1e3 * n / (n - 1) if n > 1 else 0.0,
                      steps=n - accepted, drafted=t.get("draft_n", 0), accepted=accepted)
        return Turn(stats, tokens, answer["content"], finish, prompt)

    def close(self) -> None:
        self.server.close()


def known_method(name: str) -> bool:
    return name in DRAFTERS or name == LCP_PLD or name == LLAMA_CPP or _spec_type(name) is not None


def is_peer(label: str) -> bool:
    """A method from outside racer-local's drafters other than plain decoding: what racer must beat."""
    method = label.split("#")[0]
    return method == "pld" or method == LCP_PLD or method.startswith(LLAMA_CPP)


def _spec_type(name: str) -> str | None:
    from racer_local.llama_server import SPEC_TYPES

    spec = name.removeprefix(LLAMA_CPP + "-") if name.startswith(LLAMA_CPP + "-") else None
    return spec if spec in SPEC_TYPES else None


def all_methods() -> list[str]:
    from racer_local.llama_server import SPEC_TYPES

    return [*DRAFTERS, LCP_PLD, LLAMA_CPP, *(f"{LLAMA_CPP}-{s}" for s in SPEC_TYPES)]


def peer_cpu_seconds(methods) -> float:
    """CPU seconds the methods' llama-server processes have used so far."""
    return sum(m.cpu_seconds() for m in methods if isinstance(m, LlamaCppServer))


def make_method(engine, method: str, sampling: dict, llama_server=None):
    """A runner for `method`; one that cannot start stands in as Unavailable, reporting why on
    every prompt (never dropped)."""
    if method in DRAFTERS:
        return EngineMethod(engine, method)
    try:
        if method == LCP_PLD:
            return LlamaCppPythonPLD(engine, sampling.get("repeat_last_n", 64))
        if method == LLAMA_CPP or _spec_type(method):
            if llama_server is None:
                raise RuntimeError("no llama-server binary (pass --llama-server PATH)")
            return LlamaCppServer(engine, _spec_type(method), llama_server)
    except Exception as e:
        return Unavailable(f"could not start: {type(e).__name__}: {e}")
    raise ValueError(f"unknown method {method!r}")


def labels_for(methods: list[str]) -> list[tuple[str, str]]:
    """(label, method) pairs with `ar` first; a repeated method gets a numbered label (ar#2)."""
    if BASELINE not in methods:
        methods = [BASELINE, *methods]
    seen: dict[str, int] = {}
    out = []
    for m in methods:
        seen[m] = seen.get(m, 0) + 1
        out.append((m if seen[m] == 1 else f"{m}#{seen[m]}", m))
    out.sort(key=lambda pair: pair[0] != BASELINE)
    return out
