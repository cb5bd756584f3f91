"""The rolling context: persona pinned, then as many recent turns as fit, counted before the call.

Why chunks: llama.cpp reuses the KV cache for the longest common token prefix with the
previous prompt. Dropping one turn per message would shift the whole history every turn and
force a full re-read. Instead the window keeps an *anchor* (the first turn it includes) and
only moves it when the history overflows — then far enough that the history fills at most
`trim_to` of its budget, so the next several turns append to an unchanged prefix.

In a group each user message is read with its speaker's name (and a note after a long silence):
memory/speakers.py renders it, for training exactly as here. A turn's text depends only on itself
and the turn before it in the window, so the cached prefix stays stable in groups too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memory.speakers import as_read
from memory.store import Exchange

Message = dict[str, str]
TokenCounter = Callable[[list[Message]], int]


class ContextTooLong(Exception):
    """Even with no history, the persona plus this message do not fit the context window (control flow:
    the turn is stored as refused and its author told in words, not with this text)."""


@dataclass(frozen=True)
class Context:
    messages: list[Message]
    start_turn_id: int | None   # first history turn included (the anchor), None when none is
    prompt_tokens: int          # tokens of the rendered prompt, generation prompt included
    dropped_turns: int          # history turns left out (older than the anchor)


def to_messages(persona: str, history: Sequence[Exchange], user_text: str, *, speaker: str | None = None,
                said_at: str | None = None) -> list[Message]:
    """Persona, the window's exchanges, the new message (`speaker`/`said_at`: its group label and time)."""
    messages: list[Message] = [{"role": "system", "content": persona}] if persona else []
    previous_at = None
    for ex in history:
        messages.append({"role": "user", "content": as_read(ex.user_text, ex.speaker, ex.created_at, previous_at)})
        messages.append({"role": "assistant", "content": ex.reply_text})
        previous_at = ex.created_at
    messages.append({"role": "user", "content": as_read(user_text, speaker, said_at, previous_at)})
    return messages


def build_context(*, persona: str, history: Sequence[Exchange], user_text: str, count: TokenCounter,
                  budget: int, anchor: int | None = None, trim_to: float = 0.6,
                  turn_id: int | None = None, speaker: str | None = None, said_at: str | None = None) -> Context:
    """Choose the history window for the next reply.

    `budget` is n_ctx minus the reply budget. `anchor` is where the previous context began;
    turns before it stay out so the cached prefix is reused. `turn_id` is the new turn's id:
    it becomes the anchor when no history fits, so dropped turns never creep back in.
    `speaker` and `said_at`: the new message's group label and time (memory/speakers.py).
    """
    history = list(history)
    first = 0
    if anchor is not None:
        first = next((i for i, ex in enumerate(history) if ex.turn_id >= anchor), len(history))

    def tokens_from(i: int) -> int:
        return count(to_messages(persona, history[i:], user_text, speaker=speaker, said_at=said_at))

    total = tokens_from(first)
    if total > budget:
        fixed = tokens_from(len(history))
        if fixed > budget:
            raise ContextTooLong(
                f"this message needs {fixed} tokens with the persona, more than the {budget} available "
                "(send a shorter message or raise n_ctx)")
        target = fixed + int(trim_to * (budget - fixed))
        # smallest start index whose window fits the target; token counts fall as `first` grows
        lo, hi = first + 1, len(history)
        while lo < hi:
            mid = (lo + hi) // 2
            if tokens_from(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        first = lo
        total = tokens_from(first)
    window = history[first:]
    return Context(
        messages=to_messages(persona, window, user_text, speaker=speaker, said_at=said_at),
        start_turn_id=window[0].turn_id if window else turn_id,
        prompt_tokens=total,
        dropped_turns=first,
    )
