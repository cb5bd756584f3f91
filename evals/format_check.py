"""Format (0–1): replies are well-formed chat turns.

Each format probe (config/probes.toml) is answered greedily after the persona prompt. A
reply *passes* when (1) it ended with the end-of-turn token, not by hitting the length
limit; (2) it does not continue the conversation as the other speaker (no line starting
with "user:", "User:", "Human:", "Me:", the owner's name or a role header); (3) no template
or special tokens leak into the text ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>");
(4) it is not empty. format = passing replies / probes. This is where a model that writes
the whole conversation (both speakers) instead of one reply is caught.
"""

from __future__ import annotations

import re

from config.languages import SPEAKER_LABELS
from evals.scoring import EvalModel

LEAKS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<|eot_id|>")
_LABELS = "|".join(sorted({re.escape(w) for words in SPEAKER_LABELS.values() for w in words}, key=len, reverse=True))
_OTHER_SPEAKER = re.compile(rf"(?im)^\s*(?:{_LABELS})\s*:|^\s*(?:user|assistant)\s*$")


def check_reply(text: str, finish_reason: str) -> list[str]:
    problems = []
    if not text.strip():
        problems.append("empty")
    if finish_reason != "stop":
        problems.append("did not end its turn")
    if _OTHER_SPEAKER.search(text):
        problems.append("continued as another speaker")
    if any(tok in text for tok in LEAKS):
        problems.append("template tokens leaked")
    return problems


def format_score(model: EvalModel, persona: str, conversations: list[list[dict]], *, max_tokens: int = 96) -> dict:
    passed, details = 0, []
    for conv in conversations:
        messages = ([{"role": "system", "content": persona}] if persona else []) + conv
        c = model.greedy_reply(messages, max_tokens=max_tokens)
        problems = check_reply(c.text, c.finish_reason)
        passed += not problems
        details.append({"last": conv[-1]["content"], "reply": c.text, "problems": problems})
    score = round(passed / len(conversations), 4) if conversations else 1.0
    return {"score": score, "passed": passed, "probes": len(conversations), "details": details}
