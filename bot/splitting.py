"""Cutting long replies into Telegram-sized messages at natural boundaries."""

from __future__ import annotations

TELEGRAM_LIMIT = 4096


def split_text(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Pieces of at most `limit` characters, cut at a paragraph, line, sentence or word
    boundary when one lies in the last third of the piece; never an empty piece."""
    if limit < 16:
        raise ValueError("limit too small")
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = -1
        for sep in ("\n\n", "\n", ". ", "! ", "? ", " "):
            pos = window.rfind(sep)
            if pos >= limit // 3:
                cut = pos + len(sep)
                break
        if cut <= 0:
            cut = limit
            # never split a surrogate-free but combined emoji sequence mid-way: back off ZWJ joins
            while cut > limit // 2 and rest[cut - 1] in "\u200d\ufe0f":
                cut -= 1
        piece = rest[:cut].rstrip()
        pieces.append(piece if piece else rest[:cut])
        rest = rest[cut:].lstrip("\n") if piece else rest[cut:]
    if rest.strip() or not pieces:
        pieces.append(rest)
    return pieces
