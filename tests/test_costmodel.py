"""The cost curve: interpolation, plausibility, and a cache that does not keep bad curves."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from racer_local import costmodel
from racer_local.costmodel import CostCurve


def test_time_interpolates_between_and_extrapolates_beyond_measured_sizes():
    curve = CostCurve((1, 2, 4), (0.010, 0.020, 0.030))
    assert curve.time(3) == pytest.approx(0.025)
    assert curve.time(6) == pytest.approx(0.040)  # the last segment's slope, continued
    assert curve.relative(4) == pytest.approx(3.0)


def test_a_curve_cheaper_at_n_than_at_one_is_implausible():
    assert costmodel.plausible(CostCurve((1, 2, 8), (0.01, 0.02, 0.03)))
    assert not costmodel.plausible(CostCurve((1, 2, 8), (0.01, 0.02, 0.005)))
    assert not costmodel.plausible(CostCurve((1, 2, 8), (0.01, 0.02, 0.03), (0.012, 0.011, 0.04)))


def test_a_tree_is_priced_at_the_context_it_is_verified_after():
    """Every verified token attends to the whole context: a long prompt makes trees dearer."""
    short, long = costmodel.CONTEXTS
    curve = CostCurve((1, 8), (0.010, 0.040), (0.012, 0.060))
    assert curve.time(8) == curve.time(8, short) == pytest.approx(0.040)
    assert curve.time(8, long) == pytest.approx(0.060)
    assert curve.time(8, (short + long) // 2) == pytest.approx(0.050)
    assert curve.time(8, 10) == pytest.approx(0.040)  # no cheaper than measured below the short one
    far = short + 100 * (long - short)  # linear beyond the long one, up to MAX_REACH spans
    assert curve.time(8, far) == pytest.approx(0.040 + costmodel.MAX_REACH * 0.020)
    assert CostCurve((1, 8), (0.010, 0.040)).time(8, long) == pytest.approx(0.040)  # no long curve


def test_live_cost_moves_its_prices_with_the_context_and_keeps_what_it_learned():
    from racer_local.costmodel import LiveCost

    short, long = costmodel.CONTEXTS
    base = CostCurve((1, 2, 4, 8, 16), (1.0, 1.2, 1.5, 2.0, 3.0), (1.2, 1.5, 2.0, 3.0, 5.0))
    live = LiveCost(base)
    live.at(short)
    for _ in range(5):
        live.observe(1, 1.1)  # 10% over the measurement, at the short context
    live.at(long)
    assert live.time(1) == pytest.approx(1.1 * 1.2)  # the ratio learned, the long curve's price
    assert live.time(16) / live.time(1) == pytest.approx(5.0 / 1.2)  # a long text's trees cost more
    live.at(long + LiveCost.AT_STEP - 1)  # a few tokens more: the same prices
    assert live.time(16) == pytest.approx(1.1 * 5.0)


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("RACER_LOCAL_HOME", str(tmp_path))
    monkeypatch.setattr(costmodel, "_memo", {})
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    measured = []

    def measure(backend):
        measured.append(1)
        return CostCurve((1, 2), (0.01, 0.02))

    monkeypatch.setattr(costmodel, "measure", measure)
    # n_ctx: too small a window for the long context, so the short curve is all
    backend = SimpleNamespace(model_path=model, n_threads=2, n_gpu_layers=0, rpc=(), n_batch=512, top_k=0,
                              native_top_k=0, n_ctx=512, output_layer="llama.cpp")
    return backend, measured


def test_the_curve_is_measured_once_then_read_from_disk(fake_backend, monkeypatch):
    backend, measured = fake_backend
    monkeypatch.setattr(costmodel, "_busy", lambda: False)
    assert costmodel.cached(backend).seconds == (0.01, 0.02)
    assert costmodel.measured_busy(backend) is False  # measured here, quiet
    costmodel._memo.clear()  # as a new process
    assert costmodel.cached(backend).seconds == (0.01, 0.02)
    assert len(measured) == 1
    assert costmodel.measured_busy(backend) is None  # read from disk: not this process's to judge


def test_each_output_layer_has_its_own_curve(fake_backend, monkeypatch):
    """racer-local's output layer changes what a tree costs: its curve is measured apart."""
    backend, measured = fake_backend
    monkeypatch.setattr(costmodel, "_busy", lambda: False)
    costmodel.cached(backend)
    backend.output_layer = "native"
    costmodel.cached(backend)
    backend.output_layer = "llama.cpp"
    costmodel.cached(backend)
    assert len(measured) == 2


def test_greedy_top_k_rows_from_the_output_layer_have_their_own_curve(fake_backend, monkeypatch):
    """Greedy generations read each row's best k where racer-local's layer computes a batch,
    which costs less than full rows: their curve is measured apart, and only where it applies."""
    backend, measured = fake_backend
    monkeypatch.setattr(costmodel, "_busy", lambda: False)
    backend.native_top_k = 8
    costmodel.cached(backend)  # llama.cpp's layer: native_top_k changes nothing
    backend.native_top_k = 0
    costmodel.cached(backend)
    assert len(measured) == 1
    backend.output_layer = "native"
    for k in (0, 8, 0, 8):
        backend.native_top_k = k
        costmodel.cached(backend)
    assert len(measured) == 3


@pytest.mark.parametrize("busy_then, seconds", [(True, [0.01, 0.02]), (False, [0.01, 0.001])])
def test_a_busy_or_implausible_cached_curve_is_measured_again(fake_backend, monkeypatch, busy_then, seconds):
    backend, measured = fake_backend
    monkeypatch.setattr(costmodel, "_busy", lambda: False)
    costmodel.cached(backend)
    (path,) = (costmodel.cache_dir() / "costs").iterdir()
    path.write_text(json.dumps({"busy": busy_then, "sizes": [1, 2], "seconds": seconds}))
    costmodel._memo.clear()
    costmodel.cached(backend)
    assert len(measured) == 2


@pytest.mark.parametrize("work, busy", [("burn", False), ("wait", True)])
def test_a_measurement_is_judged_busy_by_the_cpu_time_it_got(fake_backend, monkeypatch, work, busy):
    """The load average counts this process's own decoding, and the measurement's own: by it,
    every curve measured right after a generation was flagged busy and measured again by the next
    process. On the CPU the flag says whether the measurement got its threads' CPU time."""
    import time

    backend, _ = fake_backend
    backend.n_threads = 1

    def measure(backend):
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # burning: the cores were ours; else another job had them
            if work == "wait":
                time.sleep(0.01)
        return CostCurve((1, 2), (0.01, 0.02))

    monkeypatch.setattr(costmodel, "measure", measure)
    monkeypatch.setattr(costmodel, "_busy", lambda: True)  # a load average raised by our own work
    costmodel.cached(backend)
    (path,) = (costmodel.cache_dir() / "costs").iterdir()
    assert json.loads(path.read_text())["busy"] is busy
    assert costmodel.measured_busy(backend) is busy  # what the bench report flags
    backend.n_gpu_layers = -1  # offloaded: CPU time says nothing, the load average decides
    costmodel.cached(backend)
    offloaded = [p for p in (costmodel.cache_dir() / "costs").iterdir() if p != path]
    assert json.loads(offloaded[0].read_text())["busy"] is True


def test_live_cost_keeps_the_measured_dips_but_not_noise_across_octaves():
    """Even batches cost less than the odd one below them on llama.cpp's CPU kernels: the
    refined curve keeps that, so a 4-node tree is priced below a 3-node one."""
    from racer_local.costmodel import LiveCost

    base = CostCurve((1, 2, 3, 4, 5, 6, 7, 8, 16), (1.0, 1.7, 3.0, 2.4, 3.3, 2.7, 3.8, 3.4, 5.6))
    live = LiveCost(base)
    for _ in range(5):
        live.observe(3, 3.0 * 1.1)  # octave 2-3 costs 10% more than measured
    assert live.time(4) < live.time(3)  # the dip survives refinement
    assert live.time(6) < live.time(5)
    for _ in range(5):
        live.observe(8, 3.4 * 0.5)  # a noisy octave (8-15) claims half the measured cost
    assert live.time(8) >= max(min(live.time(n) for n in (2, 3)), min(live.time(n) for n in range(4, 8)))


def test_live_cost_learns_from_observed_steps_and_stays_monotone():
    from racer_local.costmodel import LiveCost

    base = CostCurve((1, 2, 4, 8, 16), (1.0, 1.2, 1.5, 2.0, 3.0))
    live = LiveCost(base)
    assert [live.time(n) for n in (1, 4, 16)] == [1.0, 1.5, 3.0]  # nothing seen: the measurement
    for _ in range(5):
        live.observe(1, 1.1)  # steps take 10% more than measured (walk, bookkeeping)
    assert live.time(1) == pytest.approx(1.1)
    assert live.time(16) == pytest.approx(3.3)  # sizes not seen yet scale too
    for _ in range(5):
        live.observe(12, base.time(12) * 2.0)  # big trees cost twice what the curve said
    assert live.time(12) == pytest.approx(2 * base.time(12))
    assert live.time(9) == pytest.approx(2 * base.time(9))  # its octave (8-15) learns with it
    times = [live.time(n) for n in range(1, 17)]
    assert times == sorted(times)  # never cheaper for more tokens
    live.observe(2, 0.01)  # one outlier moves nothing: medians
    assert live.time(2) == pytest.approx(1.1 * base.time(2))


def test_an_octave_priced_out_by_slow_steps_is_priced_again_once_unseen():
    """A few slow big trees (machine noise) must not price big trees out for good: once none
    has been seen for STALE steps, their octave's ratio moves towards the recent steps'."""
    from racer_local.costmodel import LiveCost

    base = CostCurve((1, 2, 4, 8, 16, 32), (1.0, 1.2, 1.5, 2.0, 3.0, 5.0))
    live = LiveCost(base)
    for _ in range(5):
        live.observe(24, base.time(24) * 3.0)  # three times the measurement, a busy moment
    assert live.time(24) == pytest.approx(3 * base.time(24))
    for _ in range(LiveCost.STALE - 1):
        live.observe(1, 1.0)  # then only root-only steps, at the measured cost
    assert live.time(24) == pytest.approx(3 * base.time(24))  # not yet stale
    live.observe(1, 1.0)
    assert live.time(24) == pytest.approx(3 ** 0.5 * base.time(24))  # halfway, geometrically
    for _ in range(4 * LiveCost.STALE):
        live.observe(1, 1.0)
    assert live.time(24) < 1.1 * base.time(24)  # and on towards what steps cost now
    for _ in range(6):
        live.observe(24, base.time(24) * 2.0)  # fresh evidence outweighs the faded
    assert live.time(24) == pytest.approx(2 * base.time(24))


def test_the_curve_is_measured_after_both_contexts_beside_the_committed_text(model_path):
    from racer_local.backend import Backend

    with Backend(model_path, n_ctx=2048, n_threads=2) as backend:
        text = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 120)[:1100]
        for start in range(0, len(text), 512):
            chunk = text[start : start + 512]
            backend.decode(chunk, range(start, start + len(chunk)), n_logits=1)
        crowded = costmodel.measure(backend, sizes=(1, 2, 4), repeats=1)
        assert crowded.long is None  # 1,024 + 4 more cells do not fit beside the 1,100 committed
        assert backend.pos_max(0) == len(text) - 1  # the committed text is untouched
        backend.clear()
        curve = costmodel.measure(backend, sizes=(1, 2, 4), repeats=1)
        assert curve.long is not None and len(curve.long) == 3
        assert all(backend.pos_max(seq) == -1 for seq in range(backend.n_seq_max))  # nothing left behind


@pytest.mark.parametrize("native_s,chosen", [(0.05, True), (0.098, False)])
def test_the_output_layer_is_chosen_by_measurement_once(fake_backend, monkeypatch, native_s, chosen):
    backend, _ = fake_backend
    backend.output_layer = "native"
    backend.output_layer_why = None
    state, timed = {}, []
    backend.use_native_output = lambda on: state.update(on=on)

    def time_sizes(b, sizes, repeats):
        timed.append(state["on"])
        return native_s if state["on"] else 0.1

    monkeypatch.setattr(costmodel, "_time_sizes", time_sizes)
    assert costmodel.native_output_pays(backend) is chosen
    assert timed == [False, True, False, True]  # alternated, so noise hits both alike
    assert state["on"] is chosen
    assert (backend.output_layer_why is None) is chosen
    costmodel._native_memo.clear()
    assert costmodel.native_output_pays(backend) is chosen  # from disk, no timing
    assert len(timed) == 4
