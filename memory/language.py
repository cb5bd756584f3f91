"""Which language a conversation is in, and which of the checks cover the languages stored.

Stored with every imported window (its conversation's language) and every live turn, so the
evals and the redaction can say which languages of the history they were written for. The
detector is py3langid (BSD, pure Python + numpy, its 97-language model shipped in the wheel,
about 0.1 ms a message once loaded in ~1 s). A message with fewer than MIN_LETTERS letters,
or one the model is unsure of, casts no vote: "ok", "merci!" or 😂 say nothing reliable.

Code-switching (the design documents' French/English chats): a conversation's language is its
majority language, each message voting with its number of letters; ties go to the language
seen first. A conversation in which no message is long enough is judged on all its text at
once, and is None (unknown) if that is still too short.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import cache

from config.languages import ASSISTANT_VOICE, SPEAKER_LABELS
from memory.redact import ADDRESS_LANGUAGES

MIN_LETTERS = 12
MIN_CONFIDENCE = 0.5
DETECTOR = "py3langid"
# what each check knows per language: the languages it was written for
CHECKS = {"style_drift": frozenset(ASSISTANT_VOICE), "format": frozenset(SPEAKER_LABELS),
          "redaction": frozenset(ADDRESS_LANGUAGES)}


def load() -> None:
    """Load the model now (about 1 s), e.g. at start-up, rather than on the first message."""
    _identifier()


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # ~1 s to load: only when first needed
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def letters(text: str) -> int:
    return sum(c.isalpha() for c in text)


def detect(text: str) -> str | None:
    """ISO 639-1 code of `text` ("en", "fr", …), or None when it is too short or the model unsure."""
    if letters(text) < MIN_LETTERS:
        return None
    language, confidence = _identifier().classify(text)
    return language if confidence >= MIN_CONFIDENCE else None


def majority(texts: Iterable[str]) -> str | None:
    """A conversation's language: each message votes with its letters; None when nothing tells."""
    texts = list(texts)
    votes: Counter[str] = Counter()
    for text in texts:
        language = detect(text)
        if language:
            votes[language] += letters(text)
    if votes:
        return max(votes, key=lambda lang: votes[lang])   # max keeps the first of equals: insertion order
    return detect("\n".join(texts))


def not_covered(languages: Iterable[str | None]) -> dict[str, list[str]]:
    """{language: the checks (style_drift, format, redaction) written without it}, for each language given
    that some check lacks; None and "unknown" (undetected) are skipped."""
    out = {}
    for language in sorted({lang for lang in languages if lang and lang != "unknown"}):
        missing = [check for check, known in CHECKS.items() if language not in known]
        if missing:
            out[language] = missing
    return out


def coverage(counts: dict[str, int]) -> dict:
    """The report of the history's languages ({language or "unknown": stored items}) against the checks."""
    return {"languages": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "covered": sorted(set.intersection(*map(set, CHECKS.values()))),
            "not_covered": not_covered(counts),
            "detector": DETECTOR}


def coverage_line(report: dict) -> str:
    """One line for a person: which languages of the history the checks do not cover."""
    missing = report["not_covered"]
    if not missing:
        return "languages: " + (", ".join(f"{k} {v}" for k, v in report["languages"].items()) or "none") + \
            " — all covered by style drift, format and redaction"
    return "languages NOT covered: " + "; ".join(f"{lang} (no {', '.join(checks)})" for lang, checks in missing.items())
