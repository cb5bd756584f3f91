"""Content screens: may this text become a training target (a reply the model is taught to write)?

Strangers' corrections and 👍'd replies go into the weights, so one planted link, handle, wallet or
"ignore previous instructions" would be repeated to everyone. Redaction (memory/redact.py) rewrites
personal data and keeps the text; a screen refuses the whole text, so screen the text as written.
Patterns are narrow on purpose: a false positive only costs one example, but ordinary warm chat
("Ahoy! 🌊", "I got 3.5 stars", a reply in French) must pass. Every pattern runs in linear time.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

REASONS: dict[str, str] = {
    "link": "contains a link or a bare domain (example.com, t.me/x)",
    "mention": "contains an @username handle",
    "phone": "contains a phone number",
    "crypto": "contains a crypto wallet address or a seed phrase",
    "spam": "reads like an advert or a call to action (promo code, DM me, join my channel)",
    "blocklist": "contains a word or phrase on the owner's blocklist",
    "foreign": "written mostly in a script the persona does not use",
    "too_long": "longer than the longest reply the model is taught to write",
    "repetitive": "repeats a word, phrase, line or character far more than prose does",
    "injection": "looks like a prompt injection (ignore previous instructions, role tags)",
}


@dataclass(frozen=True)
class Screens:
    blocklist: tuple[str, ...] = ()  # the owner's words or phrases, matched case-insensitively as whole words
    max_chars: int = 1200  # a reply longer than this is not a target
    reference: str = ""  # text in the persona's language (the persona prompt); its scripts are not foreign

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError(f"Screens.max_chars must be at least 1, got {self.max_chars}")


# A bare domain needs a TLD from these lists, all lower or all upper case, so "e.g.", "3.5" and a missed
# space ("fun.Me too") are not links; TLDs that are also English words ("it.me too") need a path ("t.me/x").
# File-name endings that are also TLDs (.py, .sh, .md) are left out.
_TLDS = ("com|net|org|info|biz|io|co|ly|gg|ai|app|dev|xyz|site|online|club|shop|store|click|tk|ml|ga|cf|"
         "gq|cc|tv|ws|ru|su|ua|kz|uk|fr|nl|pl|cn|jp|br|eu|ca|au|рф")
_WORD_TLDS = "me|us|by|to|de|es|in|is|it|be|no|top|live|link|pro"
_LINK = re.compile(r"(?i:\b(?:https?|tg)://|\bwww\.\w)|(?<![\w@.-])(?:[^\W_](?:[\w-]*[^\W_])?\.)+"
                   rf"(?:(?:{_TLDS}|{_TLDS.upper()})(?![\w-])|(?:{_WORD_TLDS}|{_WORD_TLDS.upper()})/\w)")
# Telegram usernames: 5-32 characters from a letter; "a@b.com" (an e-mail) and "@home" are not handles.
_MENTION = re.compile(r"(?<![\w@.])@[A-Za-z]\w{4,31}(?!\w|\.\w)")
_PHONE_RUN = re.compile(r"(?<![\w.,+])\+?\(?\d[\d ().-]*\d(?!\w)")
_WALLET = re.compile(r"\b(?:0x[0-9a-fA-F]{40}|bc1[ac-hj-np-z02-9]{25,87}"  # Ethereum-style, Bitcoin bech32
                     r"|[13][1-9A-HJ-NP-Za-km-z]{25,34}|T[1-9A-HJ-NP-Za-km-z]{33})\b")  # base58: Bitcoin, Tron
_SEED_WORDS = re.compile(r"(?i:\b(?:seed|recovery|mnemonic|wallet)\s+phrase|\b(?:your|wallet)\s+private\s+keys?\b)")
_SEED_LINE = re.compile(r"[a-z\d\s.,()-]+")
# Common words of 3-8 letters that are not BIP-39 words: one in a line rules out a seed phrase.
_PROSE_WORDS = frozenset("the and for are but not was were with your from been would could should their them "
                         "some really yeah our out who why how get got too has had did his her him she these "
                         "those than here which yes lol omg haha dont cant its gonna wanna".split())
_SPAM = re.compile("|".join([
    r"\bbuy\s+(?:now|cheap|followers|likes|subscribers)\b",
    r"\b(?:discount|promo|coupon|referral|bonus)\s*codes?\b",
    r"\bfree\s+(?:money|cash|crypto|bitcoin|btc|usdt|eth|nft|gift\s*cards?|followers|iphone|spins)\b",
    r"\bclick\s+(?:here|the\s+link|this\s+link|my\s+link|below)\b",
    r"\b(?:dm|pm|inbox)\s+me\b",
    r"\b(?:join|subscribe\s+to|follow)\s+(?:my|our)\s+(?:channel|group|server|telegram|discord|page)\b",
    r"\blink\s+in\s+(?:my\s+)?bio\b",
    r"\b(?:limited|exclusive)\s+(?:time\s+)?offer\b",
    r"\b(?:earn|make)\s+(?:money|\$?\d[\d,]*\$?)\s+(?:fast|online|daily|from\s+home|(?:per|a)\s+(?:day|week))\b",
    r"\bguaranteed\s+(?:profits?|returns?|income)\b",
    r"\bdouble\s+your\s+(?:money|crypto|bitcoin|investment)\b",
    r"\b(?:claim|get)\s+your\s+(?:free\s+)?(?:prize|reward|bonus|airdrop)\b",
    r"промокод|\bпиши(?:те)?\s+в\s+(?:лс|личку)\b|\bподпи(?:шись|сывайся|сывайтесь)\s+на\s+(?:мой|наш)\s+канал",
]), re.IGNORECASE)
_INJECTION = re.compile("|".join([
    r"\b(?:ignore|disregard|forget|override|bypass)\s+(?:(?:all|any|the|your|of|my)\s+)*"
    r"(?:previous|prior|above|earlier|preceding|system|original|initial)\s+"
    r"(?:instructions?|prompts?|rules|directions|directives|guidelines|context|programming)\b",
    r"\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+|the\s+|of\s+)*above\b",
    r"\b(?:ignore|disregard)\s+(?:all\s+|your\s+)?instructions\b",
    r"\byou\s+are\s+now\s+(?:an?\s+)?(?:dan|jailbroken|unrestricted|unfiltered|uncensored|no\s+longer\s+bound"
    r"|(?:in\s+)?(?:developer|dev|god|jailbreak)\s+mode|ai|assistant|chatbot|language\s+model|llm)\b",
    r"\bdo\s+anything\s+now\b|\b(?:system|hidden|initial)\s+prompt\b|\bsystem\s+instructions?\b",
    r"<\|[\w-]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|</?(?:system|assistant)>",
    r"###\s*(?:instruction|system|response|input)s?\b|(?m:^[ \t]*system[ \t]*:)",
    r"\b(?:игнорируй|забудь)\w*\s+(?:все\s+)?(?:предыдущие\s+|прошлые\s+)?инструкци",
]), re.IGNORECASE)
_CHAR_RUN = re.compile(r"(\S{1,4}?)\1{15,}")  # "aaaa…" or "hahaha…" 16 times; "NOOOOOOOOOOOO!" is chat
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?…\n]+")
_FOREIGN_MIN_LETTERS = 8


def _phone(run: str) -> bool:
    digits = re.sub(r"\D", "", run)
    groups = re.findall(r"\d+", run)
    if re.fullmatch(r"\d+\.\d+|\d{1,3}(?:\.\d{3})+", run):  # a decimal or 1.000.000
        return False
    least = 8 if run.startswith(("+", "00")) else 9  # "1990-2000" and "12.05.2024" have 8 digits
    return least <= len(digits) <= 15 and all(len(g) >= 2 for g in groups[1:])  # not "1 2 3 4 5 6 7 8 9"


def _wallet(address: str) -> bool:
    """Hex and bech32 shapes are unmistakable; a base58 one must mix digits with both cases, as words don't."""
    if address.startswith(("0x", "bc1")):
        return True
    return any(c.isdigit() for c in address) and any(c.isupper() for c in address[1:]) \
        and any(c.islower() for c in address)


def _seed_phrase(text: str) -> bool:
    """12-24 distinct short lowercase words and nothing else, none of them common prose, or a named phrase."""
    if _SEED_WORDS.search(text):
        return True
    for part in [text, *text.splitlines()]:
        words = re.findall(r"[a-z]+", part)
        if (len(words) in (12, 15, 18, 21, 24) and _SEED_LINE.fullmatch(part) and len(set(words)) == len(words)
                and all(3 <= len(w) <= 8 for w in words) and not _PROSE_WORDS.intersection(words)):
            return True
    return False


def _script(ch: str) -> str:
    return unicodedata.name(ch, "?").split(" ", 1)[0]  # LATIN, CYRILLIC, CJK, HIRAGANA, GREEK, ARABIC...


@lru_cache(maxsize=8)
def _scripts(reference: str) -> frozenset[str]:
    return frozenset(_script(ch) for ch in reference if ch.isalpha())


def _foreign(text: str, reference: str) -> bool:
    known = _scripts(reference)
    if not known:  # no reference, or one without letters: nothing to compare with
        return False
    letters = [_script(ch) for ch in text if ch.isalpha()]
    foreign = sum(s not in known for s in letters)
    return len(letters) >= _FOREIGN_MIN_LETTERS and foreign * 2 > len(letters)


def _repetitive(text: str) -> bool:
    if _CHAR_RUN.search(text):
        return True
    sentences = Counter(" ".join(_WORD.findall(s.lower())) for s in _SENTENCE_END.split(text))
    if any(n >= 3 and s.count(" ") >= 2 for s, n in sentences.items()):  # a line or sentence said 3 times
        return True
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 20 and max(Counter(words).values()) * 3 > len(words):
        return True
    for n in range(1, 5):  # a unit of n words said again right after itself: 8 times for a word, else 4
        run = 0
        for j in range(n, len(words)):
            run = run + 1 if words[j] == words[j - n] else 0
            if run // n + 1 >= max(4, 8 // n):
                return True
    return False


@lru_cache(maxsize=8)
def _blocklist(blocklist: tuple[str, ...]) -> re.Pattern[str] | None:
    terms = [r"\s+".join(map(re.escape, term.split())) for term in blocklist if term.strip()]
    return re.compile(rf"(?<!\w)(?:{'|'.join(terms)})(?!\w)", re.IGNORECASE) if terms else None


def screen(text: str, screens: Screens) -> list[str]:
    """The reasons `text` may not be a training target (empty: it may). Never raises."""
    blocked = _blocklist(screens.blocklist)
    found = {
        "link": bool(_LINK.search(text)),
        "mention": bool(_MENTION.search(text)),
        "phone": any(_phone(m.group(0)) for m in _PHONE_RUN.finditer(text)),
        "crypto": any(_wallet(m.group(0)) for m in _WALLET.finditer(text)) or _seed_phrase(text),
        "spam": bool(_SPAM.search(text)),
        "blocklist": bool(blocked and blocked.search(text)),
        "foreign": _foreign(text, screens.reference),
        "too_long": len(text) > screens.max_chars,
        "repetitive": _repetitive(text),
        "injection": bool(_INJECTION.search(text)),
    }
    return [reason for reason in REASONS if found[reason]]


def screens_for(settings) -> Screens | None:
    """The content screens the settings ask for (config.settings.Settings); None when the owner
    turned them off (`screen_targets = false`)."""
    if not settings.screen_targets:
        return None
    return Screens(blocklist=tuple(settings.blocklist), reference=settings.persona())
