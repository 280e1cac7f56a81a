"""Prompt lookup's match (drafters/history.py) against the plain definition: the continuation
of the most recent earlier occurrence of the longest matching suffix of context + [root]."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from racer_local.drafters.history import History


def naive(context, root, longest, limit, shortest):
    tail = [*context, root]
    for n in range(min(longest, len(tail)), shortest - 1, -1):
        want = tail[-n:]
        for end in range(len(context) - 2, -1, -1):  # most recent first; a continuation must exist
            start = end - n + 1
            if start >= 0 and context[start : end + 1] == want:
                return n, context[end + 1 : end + 1 + limit]
    return 0, []


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(0, 4), st.integers(2, 8), st.integers(1, 12),
       st.integers(1, 3))
def test_copy_is_the_longest_most_recent_match(context, root, longest, limit, shortest):
    h = History()
    h.extend(context[:7])
    h.extend(context[7:])  # grows across its initial size the same way
    assert h.copy(root, longest, limit, shortest) == naive(context, root, longest, limit, shortest)
