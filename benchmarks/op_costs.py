"""Where a verification's time goes: each kind of graph op, timed for batches of N tokens.

The cost curve (t(N)/t(1), costmodel.py) says how much a tree of N tokens costs on this machine;
this says why. It decodes batches of N tokens after --context tokens of a made-up prompt with
an eval callback that asks for every node, so ggml computes the graph node by node and the time
between two callbacks is one node's. Nodes are summed by op and name (layer numbers dropped:
"MUL_MAT ffn_up" is every layer's ffn_up matrix product), each N's best of --rounds. The
callback costs a few microseconds a node: the totals run a little above a plain decode's,
printed beside them. Then the weight matrices' quantization types, from the GGUF header:
kernels differ by type, and a type whose kernel is compute-bound costs about N times as much
for N tokens, where a memory-bound one costs about the same.

    python benchmarks/op_costs.py [-m MODEL] [--sizes 1,2,4,8,16] [--context 64] [--top 8]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import llama_cpp.llama_cpp as ll

try:
    import racer_local  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from racer_local.backend import default_threads, init_llama
from racer_local.gguf import check_gguf
from racer_local.models import resolve_model

_ggml = ctypes.CDLL(str(Path(ll.__file__).parent / "lib" / "libggml-base.so"))
for _name in ("ggml_get_name", "ggml_op_desc"):
    getattr(_ggml, _name).restype, getattr(_ggml, _name).argtypes = ctypes.c_char_p, [ctypes.c_void_p]
_ggml.ggml_type_name.restype, _ggml.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]


class Timed:
    """A context whose decodes can be timed node by node."""

    def __init__(self, path: Path, threads: int, n_batch: int) -> None:
        init_llama()
        self.times: dict[str, float] = defaultdict(float)
        self.on, self.last = False, 0.0

        @ll.ggml_backend_sched_eval_callback
        def callback(tensor, ask, _user_data):
            if ask:
                return True  # every node: computed one by one, each followed by a call here
            now = time.perf_counter()
            if self.on:
                name = _ggml.ggml_get_name(tensor).decode()
                self.times[f"{_ggml.ggml_op_desc(tensor).decode()} {re.sub(r'-[0-9]+$', '', name)}"] += \
                    now - self.last
            self.last = time.perf_counter()
            return True

        self._callback = callback  # llama.cpp keeps the pointer: keep the object alive
        self.model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 4096, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        self.plain = ll.llama_init_from_model(self.model, params)  # the same, untimed
        params.cb_eval = callback
        self.timed = ll.llama_init_from_model(self.model, params)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)

    def decode(self, ctx, tokens: list[int], first: int) -> None:
        for i, token in enumerate(tokens):
            self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = token, first + i, 1
            self.batch.seq_id[i][0], self.batch.logits[i] = 0, 1
        self.batch.n_tokens = len(tokens)
        if ll.llama_decode(ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed")

    def step(self, ctx, n: int, context: int, timed: bool) -> float:
        """Seconds to decode n tokens (every row's logits) after `context` cached ones."""
        self.times.clear()
        self.on = timed
        self.last = t0 = time.perf_counter()
        self.decode(ctx, [1000 + 7 * i for i in range(n)], context)
        took = time.perf_counter() - t0
        self.on = False
        ll.llama_memory_seq_rm(ll.llama_get_memory(ctx), 0, context, -1)
        return took


def weight_types(path: Path) -> dict[str, Counter]:
    """Matrix name (layer number dropped) -> how many of its tensors have each type."""
    out: dict[str, Counter] = defaultdict(Counter)
    for name, tensor in check_gguf(path).tensors.items():
        if len(tensor.dims) >= 2:
            out[re.sub(r"^blk\.[0-9]+\.", "", name)][_ggml.ggml_type_name(tensor.type).decode()] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="op groups shown, the costliest at the largest N")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    path = resolve_model(args.model)
    run = Timed(path, args.threads, max(sizes + [args.context]))
    prompt = [100 + (37 * i) % 5000 for i in range(args.context)]
    for ctx in (run.plain, run.timed):
        run.decode(ctx, prompt, 0)
    plain, groups = {}, {}
    for n in sizes:
        plain[n] = min(run.step(run.plain, n, args.context, False) for _ in range(args.rounds))
        best = None
        for _ in range(args.rounds):
            took = run.step(run.timed, n, args.context, True)
            if best is None or took < best[0]:
                best = (took, dict(run.times))
        groups[n] = best[1]
    print(f"{path.name}, {args.threads} threads, after {args.context} tokens; ms per decode of N tokens "
          f"(best of {args.rounds}), and x its N = 1 time")
    shown = sorted(groups[sizes[-1]], key=groups[sizes[-1]].get, reverse=True)[: args.top]
    rows = [(key, {n: groups[n].get(key, 0.0) for n in sizes}) for key in shown]
    rows += [("all ops (timed)", {n: sum(groups[n].values()) for n in sizes}), ("plain decode", plain)]
    print(f"{'op':<28}" + "".join(f"{f'N={n}':>16}" for n in sizes))
    for label, seconds in rows:
        base = seconds[sizes[0]] or float("nan")
        cells = (f"{seconds[n] * 1e3:9.2f}{seconds[n] / base:6.2f}x" for n in sizes)
        print(f"{label[:28]:<28}" + "".join(cells))
    print("\nweight matrices by type:")
    for name, types in sorted(weight_types(path).items()):
        print(f"  {name:<24} " + ", ".join(f"{t} x{c}" for t, c in types.most_common()))


if __name__ == "__main__":
    main()
