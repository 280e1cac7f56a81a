"""RACER's tree search on hand-made contexts: what its calibrated estimates let into a tree."""

from __future__ import annotations

import numpy as np

from racer_local.costmodel import CostCurve
from racer_local.drafters.racer import LOOPED, Calibration, Racer, RacerConfig, source_of

CHEAP = CostCurve(tuple(range(1, 9)), tuple(1.0 + 0.3 * (n - 1) for n in range(1, 9)))  # 0.3 a node


class Rated(Calibration):
    """Candidates rated by their sources alone: `copy` if the copy source proposed it, else `other`."""

    def __init__(self, other: float, copy: float | None = None) -> None:
        super().__init__()
        self.other, self.copy = other, other if copy is None else copy

    def p(self, key: tuple) -> float:
        return self.copy if source_of(key) == "copy" else self.other


def drafter(config: RacerConfig, calibration: Calibration) -> Racer:
    return Racer(CHEAP, config, calibration=calibration)


def test_siblings_share_one_chance_of_being_the_next_token():
    # After [1, 2] came 10, 11, 12, 13 and 14 once each: five retrieved siblings tied for best.
    context = [1, 2, 10, 1, 2, 11, 1, 2, 12, 1, 2, 13, 1, 2, 14, 1]
    racer = drafter(RacerConfig(logits=False, copy=False), Rated(0.7))
    racer.begin(context, np.zeros((1, 16), dtype=np.float32))
    tree = racer.propose(2, 16)
    first = [tree.tokens[i] for i in range(1, len(tree)) if tree.parents[i] == 0]
    assert set(first) <= {10, 11, 12, 13, 14}
    # 0.7 for the first, what is left (0.3) for the second, nothing for the other three.
    assert 1 <= len(first) <= 2


def test_a_likely_copy_keeps_its_chance_beside_unlikelier_siblings():
    # After [5, 6] the index saw 7 and 30; the copy source follows the most recent match (30, ...).
    # A copy rated 0.95 leaves 0.05 for the retrieved 7, rated 0.9 on its own.
    context = [5, 6, 7, 8, 9, 5, 6, 30, 31, 32, 33, 34, 35, 5]
    racer = drafter(RacerConfig(logits=False), Rated(0.9, copy=0.95))
    racer.begin(context, np.zeros((1, 64), dtype=np.float32))
    tree = racer.propose(6, 16)
    assert tree.n_leaves == 1  # one chain: 7 was not worth a node
    assert tree.tokens[1:5] == (30, 31, 32, 33)


def test_saved_calibrations_put_the_rates_back_and_keep_the_log():
    class Backend:  # only its identity matters: the shared calibrations are keyed by it
        pass

    from racer_local.drafters.racer import saved_calibrations, shared_calibration

    backend, key = Backend(), (None, None, (0, 0), 1)
    shared = shared_calibration(backend, "racer", True)
    shared.record(key, True)
    before = shared.p(key)
    restore = saved_calibrations(backend)
    for _ in range(5):
        shared.record(key, False)
    shared_calibration(backend, "racer-copy", True).record(key, True)  # one begun after the save
    assert shared.p(key) < before
    restore()
    assert shared.p(key) == before
    assert shared_calibration(backend, "racer-copy", True).p(key) == Calibration().p(key)
    assert shared.log[key][0] == 6  # every trial stays in the bench's calibration table


def test_a_trial_counts_once_in_its_kinds_rate_and_moves_its_untried_relatives():
    shared = Calibration()
    request = Calibration(parent=shared)  # what a generation's drafter holds
    copied, relative = (None, None, (0, 0), 1), (None, None, (0, 1), 1)  # one class: copies, depth 1
    request.record(copied, True)
    weight = Calibration.WEIGHT
    assert request.p(copied) == (1 + weight * shared.p(copied)) / (1 + weight)
    for _ in range(3):  # copies start failing in this request: an untried copy kind is trusted less
        request.record(copied, False)
    assert request.p(relative) < Calibration(parent=shared).p(relative)


class Unpruned(Racer):
    """The search without its early stop: it runs until STALE, as before the stop existed."""

    @staticmethod
    def _may_grow(*args) -> bool:
        return True


def _counted(method, calls: list):
    def counted(*args):
        calls.append(args)
        return method(*args)

    return counted


def test_the_early_stop_changes_no_tree_and_no_hindsight():
    # A bumpy curve (4 tokens cheaper than 3, 12 no dearer than 8: a bigger tree can pay again
    # after several that did not), contexts that repeat a phrase, rows that fill the table.
    sizes = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
    bumpy = CostCurve(sizes, (1.0, 1.9, 2.6, 2.4, 3.6, 3.9, 4.2, 4.4, 4.4, 5.2))
    rng = np.random.default_rng(3)
    spared = 0
    for trial in range(40):
        phrase = rng.integers(0, 40, 30).tolist()
        cut = int(rng.integers(2, 12))  # the context repeats the phrase up to here; the root is next
        context = phrase + rng.integers(0, 40, 5).tolist() + phrase[:cut]
        rows = rng.normal(size=(4, 48)).astype(np.float32) * rng.uniform(0.5, 4)
        calibration = Rated(rng.uniform(0.02, 0.6), copy=rng.uniform(0.3, 1.0))
        budget = int(rng.integers(2, 20)) if trial % 4 else 64
        outcome = []
        for cls in (Racer, Unpruned):
            racer = cls(bumpy, RacerConfig(), calibration=calibration)
            racer.begin(context, rows)
            searched = []  # one entry per node whose children the search looked up
            racer._children = _counted(racer._children, searched)
            outcome.append((racer.propose(phrase[cut], budget), racer._pending, len(searched)))
        (tree, pending, work), (tree_before, pending_before, work_before) = outcome
        assert tree == tree_before and pending == pending_before
        spared += work < work_before
    assert spared > 0  # and it did spare some searches


def _copy_tree(rate: float, risk: float):
    # The context repeats [3, 4, 5, ..., 12] after [1, 2]: the copy source offers a long chain.
    context = [1, 2, *range(3, 13), 40, 41, 1]
    racer = drafter(RacerConfig(logits=False, retrieval=False, risk=risk), Rated(rate))
    racer.begin(context, np.zeros((1, 64), dtype=np.float32))
    return racer.propose(2, 8)


def test_a_bet_that_pays_only_on_average_is_declined_when_risk_counts():
    # Copies rated 0.5 each: a 2-node tree expects 1.5 tokens for 1.3x the cost (1.15 > the 1.05
    # margin), but half the time it yields the root alone; 0.35 standard deviations (0.5) leave
    # 1.33 tokens, 1.02x: not worth it.
    assert len(_copy_tree(0.5, risk=0.0)) >= 2
    assert len(_copy_tree(0.5, risk=0.35)) == 1


def test_a_nearly_sure_copy_keeps_its_length_when_risk_counts():
    assert _copy_tree(0.97, risk=0.35).tokens == _copy_tree(0.97, risk=0.0).tokens
    assert len(_copy_tree(0.97, risk=0.35)) == 8


def test_a_loop_is_drafted_past_the_end_of_the_context_and_judged_apart():
    # The context has just gone round "1 2 3": the copy source's occurrence ends two tokens back.
    racer = drafter(RacerConfig(logits=False, retrieval=False, risk=0.0), Rated(0.97))
    racer.begin([9, 1, 2, 3, 1, 2], np.zeros((1, 16), dtype=np.float32))
    tree = racer.propose(3, 8)
    assert tree.tokens == (3, 1, 2, 3, 1, 2, 3, 1)  # the root, then round and round
    buckets = [racer._keys[tuple(tree.tokens[1 : i + 1])][0][2][0] for i in range(1, len(tree))]
    assert LOOPED not in buckets[:2] and set(buckets[2:]) == {LOOPED}
