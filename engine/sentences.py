"""Where a model's sentences end: for cutting a reply that hit its token cap back to what it finished.

A decode stopped at `max_tokens` ends mid-sentence; shown to a person or kept as a training target,
that tail reads as a fault. The interview's answers (serving/interview.py) and self-refinement's
word-budgeted rewrites (trainer/refine.py) keep whole sentences only.
"""

from __future__ import annotations

import re

_END = re.compile(r"[.!?…]+[\"'”»)\]]*(?=\s|$)")


def sentence_ends(text: str) -> list[int]:
    """The offsets just past each sentence's end mark (and any closing quote or bracket)."""
    return [m.end() for m in _END.finditer(text)]


def whole_sentences(text: str) -> str:
    """`text` back to its last finished sentence (all of it, stripped, if none finished)."""
    text = text.strip()
    ends = sentence_ends(text)
    return text[:ends[-1]] if ends else text
