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
# A Telegram bot token, bare or inside a Bot API URL (".../bot123456789:AAH…/getMe": no word boundary
# before the digits there), and API keys by their issuers' shapes: OpenAI, GitHub, AWS, Hugging Face,
# Google, Slack, and this project's own (api/keys.py: "ouro-" and 43 URL-safe characters).
_BOT_TOKEN = re.compile(r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}")
_API_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?:ouro-[A-Za-z0-9_-]{43,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{22,}|A[KS]IA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|AIza[0-9A-Za-z_-]{35,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,})")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+|00)?\d[\d ().-]{6,}\d(?!\w)")
_ACCOUNT = re.compile(
    r"\b(?:account|acct|konto|kontonummer|compte|cuenta|conta|счет|счёт)\s*"
    r"(?:no\.?|number|#|nr\.?|№|n°|nº|numéro|número)?\s*[:#]?\s*\d[\d -]{5,}\d", re.IGNORECASE)
# Street addresses, per language: how people write them in a chat. A language listed here is one
# whose addresses are redacted (memory/language.py reports the history's languages that are not).
_CAP = r"[A-ZÀ-ÖØ-ÞА-ЯЁ][\w'’.-]*"                      # a capitalised word of a street's name
_ADDRESSES = {
    "en": r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|"
          r"Court|Ct|Way|Place|Pl|Square|Sq|Terrace)\b\.?",
    "fr": rf"\b\d{{1,4}}(?:\s?(?:bis|ter))?,?\s+(?i:rue|avenue|av\.|boulevard|bd|place|chemin|allée|impasse|quai|"
          rf"route|cours|square)\s+(?:(?i:de|du|des|la|le|l'|d'|aux?)\s*)*{_CAP}(?:\s+{_CAP}){{0,3}}",
    "de": rf"\b{_CAP}(?i:straße|strasse|str\.|weg|platz|allee|gasse|ring|damm|ufer)\s*\d{{1,4}}[a-z]?\b"
          rf"|\b{_CAP}\s+(?:Straße|Strasse|Str\.|Weg|Platz|Allee|Gasse|Ring|Damm|Ufer)\s*\d{{1,4}}[a-z]?\b",
    "es": rf"(?<!\w)(?i:calle|c/|avenida|avda\.|av\.|plaza|paseo|carrera|camino|ronda|travesía)\s*"
          rf"(?:(?i:de|del|la|las|los|el)\s+)*{_CAP}(?:\s+(?:(?i:de|del|la|las|los|el)\s+)*{_CAP}){{0,3}},?\s*"
          r"(?:n[º°o]\.?\s*)?\d{1,4}",
    "pt": rf"\b(?i:rua|avenida|av\.|travessa|praça|largo|alameda|estrada)\s+"
          rf"(?:(?i:da|do|das|dos|de)\s+)*{_CAP}(?:\s+(?:(?i:da|do|das|dos|de)\s+)*{_CAP}){{0,3}},?\s*"
          r"(?:n[º°o]\.?\s*)?\d{1,5}",
    "ru": rf"(?<!\w)(?i:ул\.|улица|пр-т|проспект|пр\.|переулок|пер\.|бульвар|б-р|шоссе|площадь|пл\.|наб\.|"
          rf"набережная)\s*{_CAP}(?:\s+{_CAP}){{0,2}},?\s*(?:(?i:д\.|дом)\s*)?\d{{1,4}}(?:\s?[а-я]\b)?"
          r"(?:,?\s*(?i:кв\.|квартира)\s*\d{1,4})?",
}
ADDRESS_LANGUAGES = tuple(_ADDRESSES)
_ADDRESS = re.compile("|".join(f"(?:{p})" for p in _ADDRESSES.values()))


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
    """Replace emails, phone/card/account numbers, IBANs, street addresses (in the ADDRESS_LANGUAGES),
    secret-bearing URLs, bot tokens and API keys."""
    text = _URL.sub(_url, text)
    text = _BOT_TOKEN.sub("[secret]", text)
    text = _API_KEY.sub("[secret]", text)
    text = _EMAIL.sub("[email]", text)
    text = _IBAN.sub("[iban]", text)
    text = _ACCOUNT.sub("[account]", text)
    text = _CARD.sub(_card, text)
    text = _PHONE.sub(_phone, text)
    text = _ADDRESS.sub("[address]", text)
    return text
