"""Stop sequences (serving/stops.py): nothing from a stop on is passed on, across pieces too."""

from __future__ import annotations

import pytest

from serving.stops import StopSequence, StopWatch


def fed(stops, pieces):
    out: list[str] = []
    watch = StopWatch(stops, out.append)
    try:
        for p in pieces:
            watch.feed(p)
    except StopSequence:
        return "".join(out), watch.text, True
    watch.finish()
    return "".join(out), watch.text, False


@pytest.mark.parametrize("pieces", [["abc END def"], ["abc E", "N", "D def"], ["abc", " ", "EN", "D"]])
def test_a_stop_split_across_pieces_is_caught_and_never_shown(pieces):
    shown, text, stopped = fed(["END"], pieces)
    assert stopped and shown == text == "abc "


def test_text_that_only_looks_like_a_stop_is_held_then_passed_on():
    out: list[str] = []
    watch = StopWatch(["END"], out.append)
    watch.feed("abc E")
    assert "".join(out) == "abc "          # "E" may begin the stop: held
    watch.feed("NJOY")
    assert "".join(out) == "abc ENJOY"     # it did not
    watch.feed(" EN")
    watch.finish()
    assert "".join(out) == "abc ENJOY EN"  # the reply ended: what was held goes out


def test_the_earliest_of_several_stops_wins_and_empty_ones_are_ignored():
    shown, text, stopped = fed(["", "zz", "b"], ["a", "bzz"])
    assert stopped and shown == text == "a"
    assert fed([""], ["a", "b"]) == ("ab", "ab", False)
