"""racer-local's own output layer (output_layer.py, native/output_layer.c).

The kernel is checked against an exact numpy evaluation of the same q8_0 arithmetic on random
weights. Shapes are chosen so that every tile height and the partial last group of 16 vocabulary
rows run. On the embedded model, its rows are checked against llama.cpp's. The greedy and
sampled outputs through it are covered by test_lossless.py and test_sampling.py, which run on
the engine's default (native where it serves).
"""

from __future__ import annotations

import numpy as np
import pytest

from racer_local import output_layer
from racer_local.gguf import Header, Tensor
from racer_local.ngram import topk_rows

native = output_layer._native
pytestmark = pytest.mark.skipif(
    native is None or not native.output_layer_supported(),
    reason="the C accelerator is not built or this CPU lacks AVX-512 VNNI",
)


def _ggml_fns():
    import ctypes

    import llama_cpp.llama_cpp as ll

    return [ctypes.cast(getattr(ll._lib, f), ctypes.c_void_p).value
            for f in ("ggml_get_name", "ggml_get_data", "ggml_nelements")]


def _q8_0(rng, n_vocab, n_embd):
    """Random q8_0 weights in llama.cpp's layout, and their (scales, quants)."""
    scales = rng.uniform(0.001, 0.02, (n_vocab, n_embd // 32)).astype(np.float16)
    quants = rng.integers(-128, 128, (n_vocab, n_embd // 32, 32), dtype=np.int8)
    block = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
    raw = np.empty((n_vocab, n_embd // 32), dtype=block)
    raw["d"], raw["qs"] = scales, quants
    return raw.tobytes(), scales.astype(np.float64), quants.astype(np.int64)


def _reference(x, scales, quants):
    """ggml's q8_0 x q8_0 dot product, exactly: x quantized per 32 values, then summed in float64."""
    blocks = x.reshape(len(x), -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(blocks * inv).astype(np.int64)  # round half to even, as the x86 kernel does
    d = (amax[..., 0] / np.float32(127)).astype(np.float16).astype(np.float64)
    dots = np.einsum("rbj,vbj->rvb", q, quants)
    return np.einsum("rvb,vb,rb->rv", dots.astype(np.float64), scales, d)


@pytest.mark.parametrize("n_vocab,n_embd", [(1000 + 7, 64), (48, 96)])
def test_the_kernel_computes_ggml_s_q8_0_product(n_vocab, n_embd):
    rng = np.random.default_rng(n_vocab)
    raw, scales, quants = _q8_0(rng, n_vocab, n_embd)
    layer = native.OutputLayer(raw, n_vocab, n_embd, 24, *_ggml_fns())
    for n_rows in (1, 2, 5, 8, 9, 19, 24):  # every tile height, whole tiles and their tails
        x = rng.standard_normal((n_rows, n_embd)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
        out = np.full((n_rows, n_vocab), np.nan, dtype=np.float32)
        for threads in (1, 3):
            assert layer.logits_of(x, out, threads) == n_rows
            np.testing.assert_allclose(out, _reference(x, scales, quants), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 8, 40])
def test_its_top_k_is_the_best_k_of_its_logits(k):
    """Kept as the kernel goes, each thread its own, then merged: the same tokens and logits as
    the top k of the full rows, ties to the smaller id (rows 500 and 900 are row 7's twins, so
    their logits tie across groups and threads)."""
    n_vocab, n_embd = 1007, 64
    rng = np.random.default_rng(k)
    raw, scales, quants = _q8_0(rng, n_vocab, n_embd)
    block = n_embd // 32 * 34
    raw = bytearray(raw)
    for b in range(n_embd // 32):  # row 7 the longest: more than twice any other row's scales
        raw[7 * block + 34 * b : 7 * block + 34 * b + 2] = np.float16(0.05).tobytes()
    scales[7] = np.float16(0.05)
    for twin in (500, 900):
        raw[twin * block : (twin + 1) * block] = raw[7 * block : 8 * block]
    layer = native.OutputLayer(bytes(raw), n_vocab, n_embd, 24, *_ggml_fns())
    for n_rows in (1, 2, 9, 24):
        x = rng.standard_normal((n_rows, n_embd)).astype(np.float32)
        x[0] = (quants[7] * scales[7][:, None]).ravel()  # row 0's best: token 7 and its twins
        full = np.empty((n_rows, n_vocab), np.float32)
        layer.logits_of(x, full, 1)
        want = topk_rows(full, k)
        assert list(want[0, :3]) == [7, 500, 900][:k]
        for threads in (1, 2, 3):
            ids, logits = np.empty((n_rows, k), np.int32), np.empty((n_rows, k), np.float32)
            assert layer.top_k_of(x, k, ids, logits, threads) == n_rows
            np.testing.assert_array_equal(ids, want)
            np.testing.assert_array_equal(logits, np.take_along_axis(full, want, 1))


def test_bad_arguments_are_refused_with_the_reason():
    raw, _, _ = _q8_0(np.random.default_rng(0), 32, 64)
    fns = _ggml_fns()
    with pytest.raises(ValueError, match="must be 2176 bytes of q8_0"):
        native.OutputLayer(raw[:68 * 31], 32, 64, 4, *fns)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.OutputLayer(raw, 32, 48, 4, *fns)
    with pytest.raises(ValueError, match="ggml function"):
        native.OutputLayer(raw, 32, 64, 4, 0, 0, 0)
    layer = native.OutputLayer(raw, 32, 64, 4, *fns)
    out = np.empty((8, 32), np.float32)
    with pytest.raises(ValueError, match="4 rows at most"):
        layer.logits_of(np.zeros((5, 64), np.float32), out, 1)
    with pytest.raises(ValueError, match="rows of 64 float32"):
        layer.logits_of(np.zeros(65, np.float32), out, 1)
    with pytest.raises(ValueError, match="out holds"):
        layer.logits_of(np.zeros((4, 64), np.float32), out[:2], 1)
    with pytest.raises(ValueError, match="none captured"):
        layer.logits(out, 1)  # no decode has run through it
    ids, logits, x = np.empty((4, 8), np.int32), np.empty((4, 8), np.float32), np.ones((4, 64), np.float32)
    for k in (0, 33, 257):
        with pytest.raises(ValueError, match="k must be in 1..256"):
            layer.top_k_of(x, k, ids, logits, 1)
    with pytest.raises(ValueError, match="must hold 32 values each"):
        layer.top_k_of(x, 8, ids[:2], logits, 1)


def _header(**changes):
    tensor = Tensor(type=8, dims=(640, 1000), offset=0, nbytes=640 // 32 * 34 * 1000)
    meta = {"general.architecture": b"gemma3", **changes.pop("metadata", {})}
    return Header(meta, {"token_embd.weight": changes.pop("tensor", tensor)})


def test_models_it_cannot_serve_say_why():
    assert output_layer.unavailable(_header(), 1000, on_cpu=True) is None
    assert "GPU" in output_layer.unavailable(_header(), 1000, on_cpu=False)
    q4_k = Tensor(type=12, dims=(640, 1000), offset=0, nbytes=0)
    assert "not q8_0" in output_layer.unavailable(_header(tensor=q4_k), 1000, on_cpu=True)
    capped = _header(metadata={"gemma3.final_logit_softcapping": 30.0})
    assert "caps or scales" in output_layer.unavailable(capped, 1000, on_cpu=True)
    assert "shape" in output_layer.unavailable(_header(), 999, on_cpu=True)


def test_its_rows_are_llama_cpp_s_rows(engine):
    """A tree-shaped batch after a real context: the same best token in every row, the same
    logits to llama.cpp's own batched-vs-one-row noise; a one-row decode stays with llama.cpp."""
    backend = engine.backend
    if not backend.native_output_loaded:
        pytest.skip(f"racer-local's output layer cannot serve here: {backend.output_layer_why}")
    was, top_k = backend.output_layer, backend.top_k
    backend.set_top_k(0)  # full rows: the native layer computes them
    backend.native_top_k = 0  # (a greedy generation before this test leaves it set)
    engine.reset()
    context = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 8)
    backend.prefill(context, 0)
    tokens, at = context[3:10], len(context)
    positions = [at, at + 1, at + 2, at + 1, at + 2, at + 3, at + 1]  # three branches
    seqs = [(1, 2, 3), (1,), (1,), (2, 3), (2,), (2,), (3,)]
    try:
        rows = {}
        for on in (False, True):
            backend.use_native_output(on)
            rows[on] = backend.decode(tokens, positions, seqs).copy()
            assert backend.output_layer == ("native" if on else "llama.cpp")
            for seq in (1, 2, 3):
                backend.seq_rm(seq)
        assert (rows[True].argmax(1) == rows[False].argmax(1)).all()
        np.testing.assert_allclose(rows[True], rows[False], atol=1e-3 * np.abs(rows[False]).max())
        backend.native_top_k = 8  # greedy's rows: each one's best 8, from the same kernel
        best = backend.decode(tokens, positions, seqs)
        for seq in (1, 2, 3):
            backend.seq_rm(seq)
        np.testing.assert_array_equal(best.ids, topk_rows(rows[True], 8))
        np.testing.assert_array_equal(best.logits, np.take_along_axis(rows[True], best.ids, 1))
        captured = backend._head.captured
        one = backend.decode([tokens[0]], [at], [(1,)])
        assert backend._head.captured == captured, "a one-row decode went through the native layer"
        assert one.shape == (1, backend.n_vocab)  # a full row from llama.cpp, native_top_k or not
        backend.seq_rm(1)
    finally:
        backend.native_top_k = 0
        backend.use_native_output(was == "native")
        backend.set_top_k(top_k)
        engine.reset()


def test_asking_for_it_where_it_cannot_serve_is_an_error(model_path):
    from racer_local.backend import Backend
    from racer_local.errors import ModelError

    with pytest.raises(ValueError, match="output_layer must be one of auto, native, llama.cpp"):
        Backend(model_path, output_layer="gpu")
    with pytest.raises(ModelError, match="cannot serve .*GPU or RPC.*--output-layer llama.cpp"):
        Backend(model_path, n_ctx=256, n_gpu_layers=1, output_layer="native")


def test_a_probe_that_disagrees_with_llama_cpp_leaves_llama_cpp_s_layer(model_path, monkeypatch):
    """What a llama.cpp whose graph does more after the final norm would cause: auto falls back
    to llama.cpp's layer and says why; asking for the native layer is an error."""
    from racer_local.backend import Backend
    from racer_local.errors import ModelError

    monkeypatch.setattr(output_layer, "agrees", lambda ours, theirs: False)
    with Backend(model_path, n_ctx=256, output_layer="auto") as backend:
        assert backend.output_layer == "llama.cpp" and not backend.native_output_loaded
        assert "differ from llama.cpp's on a probe" in backend.output_layer_why
        assert backend.decode([backend.bos] * 4, range(4)).shape == (4, backend.n_vocab)
    with pytest.raises(ModelError, match="differ from llama.cpp's on a probe"):
        Backend(model_path, n_ctx=256, output_layer="native")
