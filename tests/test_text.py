"""TextStream: streamed token bytes become text that never changes once released."""

from __future__ import annotations

import pytest

from racer_local.text import TextStream

TEXT = "naïve café: 日本語, emoji 🦙🚀 and € signs"


def splits(data: bytes):
    """Every way to cut `data` into two feeds, plus byte-by-byte."""
    for k in range(len(data) + 1):
        yield [data[:k], data[k:]]
    yield [data[i : i + 1] for i in range(len(data))]


def run(stream: TextStream, feeds) -> list[str]:
    return [stream.feed(f) for f in feeds] + [stream.flush()]


# ----- UTF-8 --------------------------------------------------------------------------------------


def test_multibyte_characters_split_across_feeds_are_never_broken():
    for feeds in splits(TEXT.encode()):
        pieces = run(TextStream(), feeds)
        assert all("\ufffd" not in p for p in pieces), feeds
        assert "".join(pieces) == TEXT, feeds


def test_a_character_is_released_as_soon_as_it_is_complete():
    stream = TextStream()
    euro = "€".encode()
    assert stream.feed(euro[:1]) == ""
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:]) == "€"


def test_invalid_bytes_become_a_replacement_character_not_an_error():
    stream = TextStream()
    assert stream.feed(b"ok \xff!") == "ok \ufffd!"
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"  # the generation ended inside a character


# ----- stop strings -------------------------------------------------------------------------------

STOPPED = "The answer is 42.\n\nUser: and then?"


def test_stop_string_across_feeds_cuts_exactly_before_it():
    for feeds in splits(STOPPED.encode()):
        stream = TextStream(["\n\nUser:"])
        assert "".join(run(stream, feeds)) == "The answer is 42.", feeds
        assert stream.stopped
        assert stream.feed(b"more") == ""
        assert stream.flush() == ""


def test_the_earliest_stop_string_wins():
    stream = TextStream(["STOP2", "STOP1"])
    assert stream.feed(b"abc STOP1 def STOP2") == "abc "
    assert stream.stopped


def test_a_stop_string_with_a_multibyte_character_split_across_feeds():
    data = "prix: 5€ fin".encode()
    for feeds in splits(data):
        stream = TextStream(["€ fin"])
        assert "".join(run(stream, feeds)) == "prix: 5", feeds


def test_a_partial_stop_prefix_is_held_back_then_released_by_flush():
    stream = TextStream(["</s>"])
    assert stream.feed(b"answer <") == "answer "
    assert stream.feed(b"/") == ""
    assert not stream.stopped
    assert stream.flush() == "</"


def test_a_held_prefix_is_released_once_it_cannot_become_the_stop_string():
    stream = TextStream(["</s>"])
    assert stream.feed(b"a <") == "a "
    assert stream.feed(b"b") == "<b"


def test_overlapping_prefix_holds_only_what_could_still_match():
    stream = TextStream(["aab"])
    assert stream.feed(b"xaa") == "x"
    assert stream.feed(b"a") == "a"  # "aaa": only the last "aa" can still start "aab"
    assert stream.feed(b"b!") == ""
    assert stream.stopped


def test_a_single_string_is_one_stop_string_not_one_per_character():
    stream = TextStream("END")
    assert stream.feed(b"Every day ends at END here") == "Every day ends at "


def test_no_stop_strings_releases_everything_at_once():
    stream = TextStream()
    assert stream.feed(b"hello ") == "hello "
    assert stream.flush() == ""


@pytest.mark.parametrize("stop", [[""], ["ok", ""], ""])
def test_an_empty_stop_string_is_rejected(stop):
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(stop)
