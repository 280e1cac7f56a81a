"""The output layer of a tree verification, computed here instead of by llama.cpp (CPU only).

On a CPU, llama.cpp prices a second logits row at nearly the cost of the first. Its one-row
kernel reads the weights once; from two rows on, its tiled kernel decodes every q8_0 block again
for every row. Most of a small model's weights are in that layer: gemma-3-270m's is a 262,144 x
640 q8_0 matrix, 178 of its 235 MiB. So a tree of 2 nodes cost 1.6x one token, and one of 8
nodes cost 3.2x. native/output_layer.c repacks the matrix once, so that each load serves 16
vocabulary rows and up to 8 batch rows.

Measured here (2 threads, after 500 tokens, min of 7, llama.cpp's output layer against this one):
- gemma-3-270m: 2 rows 25.1 vs 14.8 ms, 4 rows 31.7 vs 18.6, 8 rows 49.2 vs 35.9, 16 rows 78.7 vs
  54.9.
- Qwen2.5-Coder-0.5B: 2 rows 44.5 vs 39.6 ms, 8 rows 98.6 vs 82.7.
- One row costs more this way (gemma 15.4 vs 19.1 ms), so one-row decodes stay with llama.cpp.

For greedy generations the kernel keeps each row's best k tokens as it goes instead of writing
full rows (Backend.native_top_k): 8 rows 47.1 vs 42.6 ms a forward pass on gemma-3-270m, top-k
and argmax included (min of 25, alternated), as no 1 MiB row per node is written and read again.

The hidden states come from llama.cpp's own graph. An eval callback copies the final norm's
output and stops the graph before llama.cpp's output layer runs. The logits match llama.cpp's
to about 1e-5, the same arithmetic in another order. Each model is checked against llama.cpp
on a probe batch before the layer is used. The layer is used only where it can serve: q8_0
output weights, no logit soft-capping or scaling, every layer on the CPU, and a CPU with
AVX-512 VNNI. Elsewhere llama.cpp's layer is used.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from racer_local.gguf import Q8_0, Header

try:
    from racer_local import _native
except ImportError:  # the C accelerator did not build
    _native = None

WHERE = ("auto", "native", "llama.cpp")  # Backend(output_layer=): auto uses native where it can serve
MIN_ROWS = 2  # fewer rows than this stay with llama.cpp (its one-row kernel is faster: see above)
PROBE_ROWS = 3
TOLERANCE = 1e-3  # of the probe's largest logit: llama.cpp's own batched/one-row differences are ~1e-6


def unavailable(header: Header, n_vocab: int, *, on_cpu: bool) -> str | None:
    """Why this model cannot use the native output layer here, or None when it can."""
    if _native is None or not hasattr(_native, "OutputLayer"):
        return "racer-local's C accelerator is not built"
    if not _native.output_layer_supported():
        return "this CPU lacks AVX-512 VNNI"
    if not on_cpu:
        return "the model's layers run on a GPU or RPC workers"
    arch = header.metadata.get("general.architecture")
    arch = arch.decode() if isinstance(arch, bytes) else ""
    softcap = header.metadata.get(f"{arch}.final_logit_softcapping") or 0.0
    scale = header.metadata.get(f"{arch}.logit_scale") or 1.0
    if softcap != 0.0 or scale != 1.0:
        return "the model caps or scales its logits"
    weights = _weights(header)
    if weights is None:
        return "the model has no output weights"
    if weights.type != Q8_0:
        return "its output weights are not q8_0"
    if len(weights.dims) != 2 or weights.dims[1] != n_vocab or weights.dims[0] % 32:
        return f"its output weights have an unexpected shape {weights.dims}"
    return None


def _weights(header: Header):
    return header.tensors.get("output.weight") or header.tensors.get("token_embd.weight")  # tied


def load(path, header: Header, max_rows: int):
    """The native layer for this model, its q8_0 weights repacked (a copy: 1.18x their size)."""
    weights = _weights(header)
    n_embd, n_vocab = weights.dims
    import llama_cpp.llama_cpp as ll  # not at the top: the CLI reads WHERE before --help

    lib = ll._lib  # the ggml that llama.cpp loaded: the tensors the callback sees are its own
    fns = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
           for name in ("ggml_get_name", "ggml_get_data", "ggml_nelements")]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)[weights.offset : weights.offset + weights.nbytes]
        try:
            return _native.OutputLayer(view, n_vocab, n_embd, max_rows, *fns)
        finally:
            view.release()


def agrees(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """The probe's test: the same best token in every row and logits within TOLERANCE."""
    scale = max(1.0, float(np.abs(theirs).max()))
    same_best = (ours.argmax(-1) == theirs.argmax(-1)).all()
    return bool(same_best and np.abs(ours - theirs).max() <= TOLERANCE * scale)
