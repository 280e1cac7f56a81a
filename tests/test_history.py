"""Prompt lookup's match (drafters/history.py) against the plain definition: the continuation
of the most recent earlier occurrence of the longest matching suffix of context + [root]."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from racer_local.drafters.history import History, looped


def naive(context, root, longest, limit, shortest, reference=None, near=None):
    """Searched in `reference` (by default the context itself); of the longest matches the most
    recent, or the nearest to `near` (the later of two as near)."""
    tail, ref = [*context, root], context if reference is None else reference
    for n in range(min(longest, len(tail)), shortest - 1, -1):
        want = tail[-n:]
        ends = [end for end in range(len(ref) - 2, -1, -1)  # most recent first; a continuation must exist
                if end - n + 1 >= 0 and ref[end - n + 1 : end + 1] == want]
        if ends:
            end = ends[0] if near is None else min(ends, key=lambda e: abs(e - near))
            return n, ref[end + 1 : end + 1 + limit]
    return 0, []


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(0, 4), st.integers(2, 8), st.integers(1, 12),
       st.integers(1, 3))
def test_copy_is_the_longest_most_recent_match(context, root, longest, limit, shortest):
    h = History()
    h.extend(context[:7])
    h.extend(context[7:])  # grows across its initial size the same way
    assert h.copy(root, longest, limit, shortest) == naive(context, root, longest, limit, shortest)


@given(st.lists(st.integers(0, 4), max_size=40), st.lists(st.integers(0, 4), max_size=40), st.integers(0, 4),
       st.integers(2, 8), st.integers(1, 12), st.integers(1, 3), st.none() | st.integers(0, 40))
@example([], [1, 2], 1, 4, 5, 1, None)  # nothing before the root: a one-token match is still one
@example([7, 3], [3, 1, 2], 1, 8, 5, 2, None)  # the prediction starts where the context ends
@example([3], [3, 1, 2, 3, 1, 5], 1, 8, 5, 2, 1)  # of two equal matches, the one near the output's place
def test_copy_within_a_predicted_text(context, predicted, root, longest, limit, shortest, near):
    h, p = History(), History()
    h.extend(context)
    p.extend(predicted)
    got = h.copy(root, longest, limit, shortest, within=p, near=near)
    assert got == naive(context, root, longest, limit, shortest, predicted, near)


def test_a_copy_that_runs_into_the_end_goes_round_again():
    h = History()
    h.extend([5, 6, 7, 5, 6])
    match, run = h.copy(7, 32, 7)
    assert (match, run) == (3, [5, 6])  # the occurrence ends two tokens before the context does
    assert looped(run, 7, 7) == [5, 6, 7, 5, 6, 7, 5]  # what it copied, the root, and again
