"""Personal data out before anything is written for training or export.

Patterns are deliberately broad (a false positive costs a word of training text; a false
negative leaks someone's phone number into model weights). Each match is replaced by a
typed placeholder so the model still learns the shape of the sentence.
"""

from __future__ import annotations

import re

# Every pattern runs in time linear in the text (imports redact long merged messages): an email's local
# part starts where a run of its characters starts, not at every word boundary inside one ("a.a.a.a…"
# took seconds per 20k characters), and a URL is found first, then searched once for a secret parameter.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_URL = re.compile(r"https?://\S+", re.IGNORECASE)
_SECRET_PARAM = re.compile(
    r"[?&#](?:token|access_token|api_key|apikey|key|secret|sig|signature|auth|password|pwd|session)=[^\s&#]+",
    re.IGNORECASE)
_BOT_TOKEN = re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+|00)?\d[\d ().-]{6,}\d(?!\w)")
_ACCOUNT = re.compile(r"\b(?:account|acct|konto|счет|счёт)\s*(?:no\.?|number|#|nr\.?|№)?\s*[:#]?\s*\d[\d -]{5,}\d",
                      re.IGNORECASE)
_ADDRESS = re.compile(
    r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|"
    r"Way|Place|Pl|Square|Sq|Terrace)\b\.?", re.UNICODE)


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[card]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else m.group(0)


def _url(m: re.Match) -> str:
    return "[url]" if _SECRET_PARAM.search(m.group(0)) else m.group(0)


def _phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[phone]" if 7 <= len(digits) <= 15 else m.group(0)


def redact(text: str) -> str:
    """Replace emails, phone/card/account numbers, IBANs, street addresses and secret-bearing URLs."""
    text = _URL.sub(_url, text)
    text = _BOT_TOKEN.sub("[secret]", text)
    text = _EMAIL.sub("[email]", text)
    text = _IBAN.sub("[iban]", text)
    text = _ACCOUNT.sub("[account]", text)
    text = _CARD.sub(_card, text)
    text = _PHONE.sub(_phone, text)
    text = _ADDRESS.sub("[address]", text)
    return text
