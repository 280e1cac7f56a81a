"""The bench's bound: what the copy and retrieval sources could have given on a known text."""

from __future__ import annotations

import pytest

from racer_local.headroom import cheapest, draftable


def test_draftable_follows_the_copy_run_while_it_matches_the_text():
    # After the context's "10 11", the text repeats "12 13 14" and then leaves the copy ("50").
    context = [10, 11, 12, 13, 14, 15, 99, 10, 11]
    assert draftable(context, [12, 13, 14, 50], longest=61) == [2, 1, 0, 0]
    assert draftable(context, [12, 13, 14, 50], longest=1) == [1, 1, 0, 0]


def test_draftable_takes_the_index_where_the_copy_source_picks_another_occurrence():
    # The copy source follows the most recent longest match ("6 7 9"); the n-gram index also
    # holds the older continuation "6 7 8", which the text takes.
    context = [5, 6, 7, 8, 0, 5, 6, 7, 9, 0, 5]
    assert draftable(context, [6, 7, 8, 1, 1, 1], longest=61)[0] == 2


def test_draftable_follows_a_loop_past_the_end_of_the_context():
    # The context has just gone round "1 2 3" once; the text goes round twice more.
    assert draftable([1, 2, 3, 1, 2], [3, 1, 2, 3, 1, 2, 3], longest=61)[0] == 6


def test_draftable_never_reaches_past_the_text():
    tokens = list(range(20))  # the text repeats the context's passage
    lengths = draftable([7, *tokens, 7], tokens, longest=61)
    assert lengths == [len(tokens) - 1 - i for i in range(len(tokens))]
    assert draftable([7, *tokens, 7], tokens, longest=5)[:3] == [5, 5, 5]


def test_cheapest_way_through_a_text():
    def relative(n):
        return 1 + 0.1 * (n - 1)

    # A 4-node tree at the first root, then the last token alone: 1.3 + 1.0.
    assert cheapest([3, 0, 0, 0, 0], relative, [1, 2, 4]) == pytest.approx(2.3)
    # Without that size: a 2-node tree, then three roots alone.
    assert cheapest([3, 0, 0, 0, 0], relative, [1, 2]) == pytest.approx(4.1)
    # Where N tokens cost N times one, drafting gains nothing; the root alone is always a size.
    assert cheapest([3, 2, 1, 0], lambda n: float(n), [2, 4]) == pytest.approx(4.0)
