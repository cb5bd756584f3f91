"""The rolling context: persona pinned, newest turns that fit, oldest dropped in chunks."""

from __future__ import annotations

import pytest

from memory.store import Exchange
from serving.context import ContextTooLong, build_context, to_messages
from tests.helpers.fakes import word_count

PERSONA = "You are Ouro."


def exchanges(n: int, words: int = 10) -> list[Exchange]:
    return [Exchange(i + 1, f"question {i} " + "w " * words, f"answer {i} " + "v " * words) for i in range(n)]


def test_everything_fits_keeps_all_turns_in_order():
    hist = exchanges(3)
    ctx = build_context(persona=PERSONA, history=hist, user_text="hi", count=word_count, budget=1000)
    assert ctx.messages == to_messages(PERSONA, hist, "hi")
    assert ctx.messages[0] == {"role": "system", "content": PERSONA}
    assert ctx.messages[-1] == {"role": "user", "content": "hi"}
    assert ctx.start_turn_id == 1 and ctx.dropped_turns == 0
    assert ctx.prompt_tokens == word_count(ctx.messages)


def test_overflow_drops_oldest_in_a_chunk_and_stays_under_budget():
    hist = exchanges(30)
    budget = 400
    ctx = build_context(persona=PERSONA, history=hist, user_text="hi", count=word_count, budget=budget, trim_to=0.6)
    assert ctx.prompt_tokens <= budget
    assert ctx.messages[0]["content"] == PERSONA  # persona pinned
    fixed = word_count(to_messages(PERSONA, [], "hi"))
    assert ctx.prompt_tokens <= fixed + 0.6 * (budget - fixed)  # trimmed to the chunk target, not just under
    kept = hist[ctx.dropped_turns:]
    assert ctx.start_turn_id == kept[0].turn_id
    # the newest turns are the ones kept
    assert ctx.messages[-2]["content"] == hist[-1].reply_text
    # and one more turn would not have fitted the target
    one_more = word_count(to_messages(PERSONA, hist[ctx.dropped_turns - 1:], "hi"))
    assert one_more > fixed + int(0.6 * (budget - fixed))


def test_anchor_keeps_prefix_stable_until_overflow():
    """Turn after turn, the window start only moves when the budget overflows."""
    hist = exchanges(40)
    budget, anchor, starts = 400, None, []
    for n in range(1, 41):
        ctx = build_context(persona=PERSONA, history=hist[:n], user_text="next", count=word_count, budget=budget,
                            anchor=anchor, turn_id=n + 1)
        assert ctx.prompt_tokens <= budget
        anchor = ctx.start_turn_id
        starts.append(anchor)
    moves = sum(1 for a, b in zip(starts, starts[1:], strict=False) if a != b)
    assert moves >= 2            # it did roll
    assert moves <= len(starts) // 3   # …in chunks, not every turn


def test_dropped_turns_never_come_back_even_when_window_empties():
    hist = exchanges(3, words=150)
    ctx = build_context(persona=PERSONA, history=hist, user_text="x", count=word_count, budget=200, turn_id=99)
    assert ctx.dropped_turns == 3 and ctx.start_turn_id == 99
    again = build_context(persona=PERSONA, history=hist, user_text="y", count=word_count, budget=200,
                          anchor=ctx.start_turn_id)
    assert again.dropped_turns == 3


def test_message_too_long_for_window_is_a_clear_error():
    with pytest.raises(ContextTooLong, match="tokens"):
        build_context(persona=PERSONA, history=[], user_text="w " * 500, count=word_count, budget=100)
