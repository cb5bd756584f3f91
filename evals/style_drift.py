"""Style drift (0–10, lower is better): how often the persona slips into assistant voice.

Each tone probe (config/probes.toml, at least 10) is answered greedily after the persona
prompt. A reply *drifted* when it contains any corporate/assistant marker below (case
insensitive). style_drift = 10 × drifted / probes, so 10 probes give the plain count.
"""

from __future__ import annotations

import re

from evals.scoring import EvalModel

MARKERS = [
    r"\bI'?d be (?:happy|glad) to\b", r"\bas an? (?:ai|chatbot|assistant|language model)\b",
    r"\bI'?m sorry for (?:any|the) (?:misunderstanding|confusion|inconvenience)\b", r"\bI'?m sorry to hear\b", r"\blanguage model\b",
    r"\bhow can I (?:help|assist)\b", r"\bI'?m (?:just )?an? (?:ai|assistant|chatbot|virtual assistant)\b",
    r"\bI (?:do not|don't) have (?:personal )?(?:feelings|emotions|opinions)\b", r"\bI apologi[sz]e\b",
    r"\bfeel free to\b", r"\bI'?m here to (?:help|assist)\b", r"\bcertainly!", r"\bgreat question\b",
    r"\bI hope this helps\b", r"\bplease note that\b", r"\bit'?s important to (?:note|remember)\b",
]
_MARKER_RE = re.compile("|".join(MARKERS), re.IGNORECASE)


def is_assistant_voice(text: str) -> bool:
    return bool(_MARKER_RE.search(text))


def style_drift_score(model: EvalModel, persona: str, probes: list[str], *, max_tokens: int = 64) -> dict:
    drifted, replies = 0, []
    for probe in probes:
        messages = ([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": probe}]
        text = model.greedy_reply(messages, max_tokens=max_tokens).text
        hit = is_assistant_voice(text)
        drifted += hit
        replies.append({"probe": probe, "reply": text, "assistant_voice": hit})
    score = round(10.0 * drifted / len(probes), 3) if probes else 0.0
    return {"score": score, "drifted": drifted, "probes": len(probes), "replies": replies}
