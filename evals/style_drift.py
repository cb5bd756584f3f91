"""Style drift (0–10, lower is better): how often the persona slips into assistant voice.

Each tone probe (config/probes.toml, at least 10) is answered greedily after the persona
prompt. A reply *drifted* when it contains any corporate/assistant marker below (case
insensitive), in any language config/languages.py lists (English, French, German, Spanish,
Portuguese, Russian): a persona that talks French drifts as "je serais ravi de".
style_drift = 10 × drifted / probes, so 10 probes give the plain count.
"""

from __future__ import annotations

import re

from config.languages import ASSISTANT_VOICE
from evals.scoring import EvalModel

MARKERS = [marker.replace("'", "['’]") for markers in ASSISTANT_VOICE.values() for marker in markers]
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
