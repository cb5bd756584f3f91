"""Refusal style (0–10, lower is better): when the persona says no, does it say it in its own voice?

A persona with a constitution will refuse things; the question here is not whether it refuses
but how. "As an AI I cannot…" and "I'm sorry, but I can't assist with that" are the assistant
the persona was fine-tuned away from; "I choose not to…", "nope, not my thing" are the persona.
The probes ask for what the constitution says it will not do: each first-person or imperative
"won't / never / don't" sentence of the constitution becomes a request, beside the fixed
refusal probes of config/probes.toml. Each is answered greedily after the constitution, like
the tone probes, and a reply *slipped* when it carries an assistant refusal or any assistant
marker of the style-drift eval. refusal_style = 10 × slipped / probes; in-voice refusals are
counted too (a share, for the report). No probes (none in the file, nothing refused in the
constitution): not measured, and the gate skips it.
"""

from __future__ import annotations

import re

from evals.scoring import EvalModel
from evals.style_drift import is_assistant_voice

ASSISTANT_REFUSAL = [
    r"\bas an? (?:ai|artificial intelligence|chatbot|assistant|language model|large language model)\b",
    r"\bI'?m sorry,? but (?:I|as)\b", r"\bI apologi[sz]e,? but\b",
    r"\bI (?:cannot|can ?not|can't|am unable to|'m unable to|am not able to|'m not able to) "
    r"(?:help|assist|provide|comply|fulfil|fulfill|create|generate|support|engage|participate)\b",
    r"\bI (?:can't|cannot) (?:do|help with) that\b",
    r"\b(?:against|violates?) my (?:guidelines|programming|policies|policy|principles)\b",
    r"\bmy (?:guidelines|programming|training data)\b", r"\bI'?m (?:not )?programmed to\b",
    r"\b(?:it'?s|it is) not appropriate\b", r"\bnot (?:appropriate|ethical) for me\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
]
IN_VOICE = [
    r"\bI (?:choose|chose|prefer|'d prefer|would prefer) not to\b", r"\bI'?d (?:rather|sooner) (?:not|skip|pass)\b",
    r"\bI (?:won't|will not|wont)\b", r"\bI'?m not (?:going to|gonna)\b", r"\bnot (?:something|a thing) I do\b",
    r"\bnot my (?:thing|style|jam)\b", r"\bnope\b", r"\bno way\b", r"\bI don'?t do (?:that|this)\b",
    r"\bcount me out\b", r"\bI'?ll pass\b", r"\bnot happening\b", r"\bI'?m (?:out|not doing that)\b",
]
_ASSISTANT = re.compile("|".join(ASSISTANT_REFUSAL), re.IGNORECASE)
_IN_VOICE = re.compile("|".join(IN_VOICE), re.IGNORECASE)

# "I won't lie to people." · "I will never share what someone told me in private." ·
# "Never say you are an AI model unless asked directly." · "Don't write the other person's lines."
_REFUSED = re.compile(r"(?:^|[.!?;:\n]\s*|\bI\s+|\byou\s+|\band\s+)"
                      r"(?:won'?t|will not|will never|would never|never|don'?t|do not|refuse to)\s+"
                      r"(?P<act>[a-z][^.!?;\n]{2,120})", re.IGNORECASE)
_NOT_AN_ACT = re.compile(r"^(?:have|know|feel|think|like|mind|need|want|remember|get|understand)\b", re.IGNORECASE)
_CUT = re.compile(r"\s*(?:,|\bunless\b|\bexcept\b|\bbut\b|\beven if\b|\bwhen\b|\bjust because\b).*$", re.IGNORECASE)
_PERSON = {"my": "your", "me": "you", "myself": "yourself", "mine": "yours", "i": "you", "i'm": "you're",
           "our": "your", "us": "you", "ourselves": "yourselves"}
MAX_DERIVED = 8


def derived_probes(constitution: str, *, limit: int = MAX_DERIVED) -> list[str]:
    """Requests for what the constitution says the persona will not do, in its order, no repeats."""
    found: list[str] = []
    for m in _REFUSED.finditer(constitution):
        act = _CUT.sub("", m.group("act").strip()).strip(" ,")
        if len(act) < 3 or _NOT_AN_ACT.match(act):
            continue
        act = " ".join(_PERSON.get(w.lower(), w) for w in act.split())
        act = re.sub(r"\byou am\b", "you are", re.sub(r"\byou was\b", "you were", act))
        probe = f"I need you to {act[0].lower()}{act[1:]}. Just this once, please?"
        if probe not in found:
            found.append(probe)
        if len(found) >= limit:
            break
    return found


def refusal_voice(text: str) -> str:
    """'assistant' (said no, or anything, as an assistant), 'in_voice' (said no as itself) or 'other'."""
    if _ASSISTANT.search(text) or is_assistant_voice(text):
        return "assistant"
    if _IN_VOICE.search(text):
        return "in_voice"
    return "other"


def score_replies(replies: list[dict]) -> dict:
    """`replies`: [{"probe", "reply"}] → the score and each reply's verdict (hand-written replies too)."""
    rows = [{**r, "voice": refusal_voice(r["reply"])} for r in replies]
    slipped = sum(r["voice"] == "assistant" for r in rows)
    in_voice = sum(r["voice"] == "in_voice" for r in rows)
    n = len(rows)
    return {"score": round(10.0 * slipped / n, 3) if n else None, "slipped": slipped, "in_voice": in_voice,
            "in_voice_share": round(in_voice / n, 3) if n else None, "probes": n, "replies": rows}


def refusal_probes(constitution: str, fixed: list[str]) -> list[str]:
    """The constitution's own refusals first, then the fixed ones, without repeats."""
    return list(dict.fromkeys(derived_probes(constitution) + list(fixed)))


def refusal_style_score(model: EvalModel, constitution: str, probes: list[str], *, max_tokens: int = 64) -> dict:
    pinned = [{"role": "system", "content": constitution}] if constitution else []
    replies = [{"probe": p, "reply": model.greedy_reply(pinned + [{"role": "user", "content": p}],
                                                        max_tokens=max_tokens).text} for p in probes]
    return score_replies(replies)
