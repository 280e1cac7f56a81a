"""The measured cost of verifying N tokens in one llama_decode, relative to one token.

On a CPU verifying 8 tokens costs several times one token, and the curve is not even
monotone (llama.cpp picks kernels by batch size: here 8 tokens cost less than 6). So the
tree size is chosen from this machine's own curve: measured once per model and thread count
(a few seconds, on a scratch sequence id that never touches the committed text), cached on
disk, and interpolated between measured sizes. It is measured after a short and after a long
context (`CONTEXTS`) and priced at the context of the moment: every verified token attends to
the whole context, and the curve's shape moves with its length. A curve
measured on a busy moment has the wrong shape, so `LiveCost` refines it from the step times the
decode loop observes: per size octave, the median of the recent steps' ratio to the measured
curve, and never cheaper for more tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from racer_local import topk
from racer_local.backend import Backend
from racer_local.errors import ModelError
from racer_local.models import cache_dir

# Tree sizes measured, and the only ones racer chooses: a size between two measured ones is never
# priced by interpolation, since llama.cpp's CPU kernels make an odd batch cost much more than
# the even one above it (gemma-3-270m here, 2 threads, x one token: t(7) 4.46, t(8) 4.20,
# t(15) 8.40, t(16) 6.40, t(31) 11.37, t(32) 10.55). 62: the largest even tree n_seq_max 64 allows.
SIZES = (*range(1, 13), 14, 16, 20, 24, 28, 32, 40, 48, 56, 62)


# Contexts (tokens) the curve is measured after. Relative to one token at the same context, the
# cost of N moves with it (here, 2 threads, min of 7, after 1,024 vs 64 tokens: Qwen2.5-Coder-0.5B
# t(8) 4.46 vs 4.09, t(16) 6.55 vs 5.69, t(24) 9.63 vs 8.08; gemma-3-270m, whose sliding-window
# layers see 512 tokens at most, t(16) 5.73 vs 5.47, t(24) 8.29 vs 7.18), and a curve from the
# short context alone mispriced long prompts' trees: side by side on the Qwen model (16 dev
# prompts, same text, 2 rounds), racer 1.14x `ar` priced at the context, 1.10x priced after 64.
# In between and beyond, the cost is linear in the context, as attention is (up to MAX_REACH
# times the span).
CONTEXTS = (64, 1024)
MAX_REACH = 3.0

# CPU seconds over wall seconds x threads below this: other work competed for the cores (alone,
# a bench prompt's share is about 0.9 here). For a curve being measured and a bench's prompts.
BUSY = 0.6


@dataclass(frozen=True)
class CostCurve:
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]  # fastest observed wall time of one decode of each size, short context
    long: tuple[float, ...] | None = None  # the same after the long context; None: not measured

    def time(self, n: int, context: int | None = None) -> float:
        """Seconds to verify n tokens after `context` tokens (None: the short context), linear
        in between and beyond the measured sizes and contexts."""
        short = _interp(n, self.sizes, self.seconds)
        if self.long is None or context is None:
            return short
        return short + _reach(context) * (_interp(n, self.sizes, self.long) - short)

    def relative(self, n: int) -> float:
        return self.time(n) / self.seconds[0]

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds),
                "relative": [round(self.relative(n), 3) for n in self.sizes],
                **({"contexts": list(CONTEXTS), "long": list(self.long),
                    "long_relative": [round(t / self.long[0], 3) for t in self.long]} if self.long else {})}


def _interp(n: int, sizes, secs) -> float:
    if n >= sizes[-1]:
        slope = (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2])
        return secs[-1] + slope * (n - sizes[-1])
    return float(np.interp(n, sizes, secs))


def _reach(context: int) -> float:
    """How far `context` lies from the short measured context towards the long one."""
    short, long = CONTEXTS
    return min(max(context - short, 0) / (long - short), MAX_REACH)


def measure(backend: Backend, sizes=SIZES, repeats: int = 5) -> CostCurve:
    """Time decodes of each size after each of CONTEXTS, on the last sequence id (the long one
    left out when the cells free beside the committed text cannot hold it).

    The minimum over repeats, not the median: other work on the machine only ever adds time,
    and a curve distorted by a busy moment would be cached.
    """
    short, long = CONTEXTS
    sizes = tuple(n for n in sizes if n <= min(backend.n_batch, backend.n_ctx - short))
    seconds = _timed(backend, sizes, repeats, short)
    if long + sizes[-1] > backend.n_ctx - (backend.pos_max(0) + 1):
        return CostCurve(sizes, seconds)
    return CostCurve(sizes, seconds, _timed(backend, sizes, repeats, long))


def _complete(backend: Backend, curve: CostCurve) -> bool:
    """Measured after both contexts, or in a window too small for the long one ever to fit."""
    return curve.long is not None or CONTEXTS[1] + curve.sizes[-1] > backend.n_ctx


def _timed(backend: Backend, sizes, repeats: int, prefix: int) -> tuple[float, ...]:
    timings: dict[int, list[float]] = {n: [] for n in sizes}
    with _scratch(backend, prefix, rows_as_set=True) as decode:
        for _ in range(repeats):
            for n in sizes:  # interleaved, so machine noise hits every size alike
                t = time.perf_counter()
                decode(n)
                timings[n].append(time.perf_counter() - t)
    return tuple(min(timings[n]) for n in sizes)


@contextmanager
def _scratch(backend: Backend, prefix: int = 64, rows_as_set: bool = False):
    """decode(n): n tokens with their rows after a `prefix`-token context on the last sequence
    id, then rolled back; the committed text (sequence 0) is never touched. Rows are full rows
    (what the choices between output layers and row modes compare) unless `rows_as_set`."""
    seq, token = backend.n_seq_max - 1, backend.bos
    was = backend.native_top_k
    if not rows_as_set:
        backend.native_top_k = 0

    def decode(n: int):
        rows = backend.decode([token] * n, range(prefix, prefix + n), [(seq,)] * n)
        backend.seq_rm(seq, prefix, -1)
        return rows

    try:
        for start in range(0, prefix, backend.n_batch):
            n = min(backend.n_batch, prefix - start)
            backend.decode([token] * n, range(start, start + n), [(seq,)] * n, n_logits=1)
        yield decode
    finally:
        backend.seq_rm(seq)
        backend.native_top_k = was


# key -> (curve, whether this process measured it busy; None: it was read from disk)
_memo: dict[str, tuple[CostCurve, bool | None]] = {}


def _rows_read(backend: Backend) -> list:
    """How a generation reads rows, where that is not full rows: a curve is measured that way."""
    rows = [backend.top_k] if backend.top_k else []
    if backend.native_top_k and backend.output_layer == "native":
        rows += ["native-top-k", backend.native_top_k]
    return rows


def cached(backend: Backend) -> CostCurve:
    """The curve for this model, threads and offload, measured on first use and kept on disk.

    A curve measured while the machine was busy can have the wrong shape, and every later
    run would size its trees by it; so a cached curve that was measured busy, or that is
    impossible (N tokens cheaper than one), is measured again when the machine is quiet. One
    that lacks the long context for want of free cells is kept for this process only.
    """
    key = _curve_key(backend)
    if key in _memo:
        return _memo[key][0]
    path = _path(key)
    try:
        data = json.loads(path.read_text())
        long = data.get("long")
        curve = CostCurve(tuple(data["sizes"]), tuple(data["seconds"]), tuple(long) if long else None)
        stale = (not plausible(curve) or not _complete(backend, curve)
                 or (data.get("busy", True) and not _busy()))
    except (OSError, ValueError, KeyError):
        curve, stale = None, True
    busy = None
    if stale:
        on_cpu = backend.n_gpu_layers == 0 and not backend.rpc
        busy = not on_cpu and _busy()
        wall, cpu = time.perf_counter(), time.process_time()
        curve = measure(backend)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if on_cpu:  # a core taken by other work shows as CPU time this process did not get
            busy = wall > 0.1 and cpu / (wall * backend.n_threads) < BUSY
        if _complete(backend, curve):  # else measured again by the next process
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "busy": busy, **curve.to_dict()}))
    _memo[key] = curve, busy
    return curve


def measured_busy(backend: Backend) -> bool | None:
    """Whether cached() measured this backend's curve in this process with the machine busy (so
    the next quiet process measures it again); None if the curve came from disk."""
    return _memo.get(_curve_key(backend), (None, None))[1]


def _curve_key(backend: Backend) -> str:
    return _key(backend, SIZES, CONTEXTS, *_rows_read(backend))


def _key(backend: Backend, *what) -> str:
    """What a measurement here depends on: model file, threads, offload, batch, output layer,
    llama.cpp, CPU."""
    import llama_cpp

    st = backend.model_path.stat()
    where = [backend.n_gpu_layers, *([list(backend.rpc)] if backend.rpc else [])]  # RPC workers too
    if backend.output_layer != "llama.cpp":  # (curves measured before it existed keep their keys)
        where.append(backend.output_layer)
    return json.dumps([str(backend.model_path.resolve()), st.st_size, st.st_mtime_ns, backend.n_threads,
                       *where, backend.n_batch, llama_cpp.__version__, platform.processor(),
                       os.cpu_count(), *what])


def _path(key: str) -> Path:
    return cache_dir() / "costs" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


_top_k_memo: dict[str, bool] = {}


# The backend's top-k must beat full rows by this much to be chosen. On a CPU the two are close
# (gemma-3-270m here, 2 threads: within 1% summed over 1 and 8 rows, either way between runs, yet
# 13% slower for `ar`'s one row in a bench); on a GPU full rows cross the bus (1 MiB a row for a
# 262k vocabulary) and the backend should win by far more.
TOP_K_MARGIN = 0.9


def top_k_pays(backend: Backend, k: int) -> bool:
    """Whether verification here is clearly faster with each row's top k taken inside
    llama.cpp's graph (Backend.set_top_k) than with full rows read on the host, top k included:
    measured once per model, threads and offload, kept on disk; false where the backend refuses."""
    key = _key(backend, "top-k", k)
    if key not in _top_k_memo:
        path = _path(key)
        try:
            _top_k_memo[key] = bool(json.loads(path.read_text())["backend"])
        except (OSError, ValueError, KeyError):
            try:
                host, graph = _time_rows(backend, k)
            except ModelError:  # llama.cpp refuses samplers here (a tensor split): full rows it is
                host, graph = 0.0, None
            path.parent.mkdir(parents=True, exist_ok=True)
            pays = graph is not None and graph < TOP_K_MARGIN * host
            path.write_text(json.dumps({"key": key, "host_s": host, "backend_s": graph, "backend": pays}))
            _top_k_memo[key] = pays
    return _top_k_memo[key]


def _time_rows(backend: Backend, k: int, sizes=(1, 16), repeats: int = 3) -> tuple[float, float]:
    """Seconds to verify and read the top k of one batch of each size, summed: (host, backend).
    Modes alternate twice, each time the minimum of its repeats is kept (noise only adds)."""
    was, best = backend.top_k, {0: np.inf, k: np.inf}
    try:
        for mode in (0, k, 0, k):
            backend.set_top_k(mode)
            best[mode] = min(best[mode], _time_sizes(backend, sizes, repeats, lambda rows: topk.top(rows, k)))
    finally:
        backend.set_top_k(was)
    return best[0], best[k]


_native_memo: dict[str, bool] = {}

# racer-local's output layer must beat llama.cpp's by this much to be chosen. Here it is faster
# by 30-40% on gemma-3-270m and 10-15% on Qwen2.5-Coder-0.5B (output_layer.py).
NATIVE_MARGIN = 0.95


def native_output_pays(backend: Backend) -> bool:
    """Whether multi-row batches here are clearly faster through racer-local's output layer than
    through llama.cpp's (rows read included): measured once per model, threads and CPU, kept on
    disk. The backend is left on the faster one."""
    key = _key(backend, "output-layer")
    if key not in _native_memo:
        path = _path(key)
        try:
            _native_memo[key] = bool(json.loads(path.read_text())["native"])
        except (OSError, ValueError, KeyError):
            best = {False: np.inf, True: np.inf}
            for on in (False, True, False, True):  # alternated: noise hits both alike
                backend.use_native_output(on)
                best[on] = min(best[on], _time_sizes(backend, (2, 8), repeats=3))
            pays = best[True] < NATIVE_MARGIN * best[False]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "llama_cpp_s": best[False], "native_s": best[True],
                                        "native": pays}))
            _native_memo[key] = pays
    backend.use_native_output(_native_memo[key])
    if not _native_memo[key]:
        backend.output_layer_why = "it measured no faster than llama.cpp's here"
    return _native_memo[key]


def _time_sizes(backend: Backend, sizes, repeats: int, read=lambda rows: rows) -> float:
    """Seconds to decode one batch of each size and `read` its rows, the fastest of `repeats`,
    summed."""
    total = 0.0
    with _scratch(backend) as decode:
        for n in sizes:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                read(decode(n))
                runs.append(time.perf_counter() - start)
            total += min(runs)
    return total


def plausible(curve: CostCurve) -> bool:
    """Verifying N > 1 tokens can never be cheaper than verifying one, after either context."""
    return all(all(s >= secs[0] for s in secs[1:]) for secs in (curve.seconds, curve.long or ()))


def _busy() -> bool:
    """Other work is running: the 1-minute load is above a quarter of the cores. It counts this
    process's own recent work too (and a measurement's own), so on the CPU a measurement is
    judged by the CPU time it got instead (see cached)."""
    try:
        return os.getloadavg()[0] > 0.25 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


class LiveCost:
    """A measured curve refined online from observed step times (seconds per tree size).

    time(n) = measured(n) x the median ratio observed/measured of the last WINDOW steps whose
    size shares n's octave (1, 2-3, 4-7, 8-15, ...: big trees are rare, so neighbours pool
    their evidence), or of the last steps of any size while that octave has fewer than
    MIN_SEEN. Observed steps include the walk and the bookkeeping, which the measurement
    leaves out, so the refined curve is the cost a step really has.

    The measured shape is kept, dips included: llama.cpp's CPU kernels make an even batch
    cheaper than the odd one below it (gemma-3-270m and Qwen2.5-Coder-0.5B here, 2 threads,
    min of 7: t(3) 3.02 and 2.76, t(4) 2.52 and 2.35 x one token), so a 4-node tree beats a
    3-node one whatever its 4th node, and a curve forced non-decreasing hid that (it priced
    t(4) as t(3)). Only across octaves, where the ratios differ, is noise kept from making
    bigger trees look cheaper: no size costs less than the cheapest of a smaller octave.
    `at(context)` moves the measured curve to the present context; the ratios stay.

    An octave's evidence fades once no tree of its sizes has been seen for STALE steps: its
    ratio moves halfway to the recent steps' (geometrically), and again after each STALE steps
    more. Otherwise a few slow steps price an octave out for good, since no tree of its sizes
    is chosen again to correct them. Seen here on gemma-3-270m in a bench: racer's first big
    trees of a run took 63-72 ms a step against copies' 47 at the same sizes, then racer kept to
    7-node trees for the next 56 steps, translation included (3.39x `ar` against copies' 4.69x),
    where another run of the same code had verified 26-32-node trees.

    The state is a few floats per octave, priced per size on demand: every step pays an
    observation and a search's prices, a root-only step too (20-30 us together here, against
    30-75 us for the numpy tables this replaced, min and median of 15 rounds).
    """

    WINDOW = 16
    MIN_SEEN = 3
    STALE = 64  # steps: about a reply's worth, so a request re-tries what the last one priced out
    AT_STEP = 32  # tokens of context growth before the prices move with it (about 25 us each time)

    def __init__(self, base: CostCurve) -> None:
        self.base, self.sizes = base, base.sizes
        top = max(base.sizes)
        self._short = [base.time(max(n, 1)) for n in range(top + 1)]
        self._long = [base.time(max(n, 1), CONTEXTS[1]) for n in range(top + 1)]
        self._octave = [max(n, 1).bit_length() for n in range(top + 1)]
        self._ratio: list[float | None] = [None] * (self._octave[-1] + 1)  # once seen MIN_SEEN times
        self._seen: dict[int, deque] = {}
        self._last: dict[int, int] = {}  # octave -> the step that last saw (or faded) it
        self._steps = 0
        self._recent: deque = deque(maxlen=self.WINDOW)
        self._context: int | None = None
        self._set_base(self._short)

    def _set_base(self, base: list[float]) -> None:
        self._base = base  # the measured curve at the present context
        self._base_min = [float("inf")] * len(self._ratio)  # per octave (0 holds no size)
        for b, k in zip(base, self._octave):
            self._base_min[k] = min(self._base_min[k], b)
        self._refresh()

    def at(self, context: int) -> None:
        """Price the next steps after `context` tokens; observed ratios carry over, as they
        are to the measured curve at the context each step had."""
        if self._context is not None and abs(context - self._context) < self.AT_STEP:
            return
        self._context = context
        reach = _reach(context)
        self._set_base([s + reach * (lo - s) for s, lo in zip(self._short, self._long)])

    def observe(self, n: int, seconds: float) -> None:
        if not 1 <= n < len(self._base):
            return
        ratio = seconds / self._base[n]
        octave = self._octave[n]
        self._steps += 1
        self._fade()
        seen = self._seen.setdefault(octave, deque(maxlen=self.WINDOW))
        seen.append(ratio)
        self._recent.append(ratio)
        self._last[octave] = self._steps
        if len(seen) >= self.MIN_SEEN:
            self._ratio[octave] = _median(seen)
        self._refresh()

    def _fade(self) -> None:
        """Move the ratio of each octave unseen for STALE steps halfway to the recent steps'."""
        for octave, last in self._last.items():
            ratio = self._ratio[octave]
            if self._steps - last < self.STALE or ratio is None or not self._recent:
                continue
            factor = (_median(self._recent) / ratio) ** 0.5
            self._seen[octave] = deque((r * factor for r in self._seen[octave]), maxlen=self.WINDOW)
            self._ratio[octave] = _median(self._seen[octave])
            self._last[octave] = self._steps

    def _refresh(self) -> None:
        """Per octave, its ratio (the recent steps' while it has too few) and a floor: the
        dearest of the smaller octaves' cheapest sizes."""
        fallback = _median(self._recent) if self._recent else 1.0
        self._ratios = [fallback if r is None else r for r in self._ratio]
        self._floors, floor = [], 0.0
        for k, ratio in enumerate(self._ratios):
            self._floors.append(floor)
            if k:
                floor = max(floor, ratio * self._base_min[k])

    def time(self, n: int) -> float:
        if n < len(self._base):
            k = self._octave[n]
            return max(self._base[n] * self._ratios[k], self._floors[k])
        top = len(self._base) - 1
        return self.base.time(n, self._context) * (self.time(top) / self._base[top])


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


_live: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def live(backend: Backend, method: str) -> LiveCost:
    """The backend's curve as `method` sees it (its per-row bookkeeping included), refined by
    every generation of that method on the backend, in its present row mode (full or top-k, from
    llama.cpp or from racer-local's output layer) and output layer."""
    by_method = _live.setdefault(backend, {})
    key = (method, backend.output_layer, *_rows_read(backend))
    if key not in by_method:
        by_method[key] = LiveCost(cached(backend))
    return by_method[key]
