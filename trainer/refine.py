"""Self-refinement: the active generation critiques its own replies against the constitution and
writes the reply it should have given (chain of hindsight) — proposals an admin keeps or drops.

Why: a bare 👎 says only "not this". Read with the constitution in front of it, the generation that
wrote the reply can often say why (the 👎's reasons help: "too long", "off-topic") and do better;
a kept proposal is then a preference pair (refined = chosen, served = rejected) the next cycle
trains on, so a 👎 teaches what to say instead. The same is practised on a few scenarios that test
the constitution's rules, where the "served" reply is the generation's own answer as served.

Two greedy calls per proposal — first the critique, then the rewrite with the critique in view — so
each output is plain text and a small model need not keep a format; what it writes is still checked
(`clean_critique`, `clean_reply`) and a botched output is dropped and counted, never stored. It runs
at the start of each cycle (trainer/cycle.py, on the parent's GGUF, as the evals load theirs) and on
`ouro refine`; at most `refine_per_cycle` 👎'd turns (newest first) and `refine_scenarios` scenarios.
A 👎 "too long" asks for the rewrite in at most half the served reply's words and caps its decode
near them, keeping its whole sentences (`word_budget`, `within_budget`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from config.scenarios import load_scenarios
from config.settings import Settings
from core.errors import OuroError
from engine.sentences import sentence_ends
from lineage.constitution import constitution_text
from memory.feedback import REASONS
from memory.screens import screen, screens_for
from memory.store import Store

log = logging.getLogger(__name__)

CRITIQUE_TOKENS = 96        # a critique is one or two sentences
MIN_WORDS = 12              # the shortest word budget a "too long" rewrite is given
TOKENS_PER_WORD = 1.5       # English words to tokens, for a budget's decode cap (a few spare tokens added)
_QUOTE = 600                # characters of the question and the served reply quoted in a prompt
_CRITIQUE_CHARS = 400


def constitution(settings: Settings) -> str:
    """The constitution proposals are written against: the draft the next cycle trains with (the
    interview's, when there was one; lineage/constitution.py) — the kept pairs teach that text."""
    return constitution_text(settings)


class Writer(Protocol):
    """What writes proposals: `GreedyWriter` below (llama.cpp), or evals.scoring.EvalModel."""

    def greedy_reply(self, messages: list[dict], max_tokens: int = 96): ...   # returns an object with .text


# --- the prompts (deterministic: the same inputs give the same messages) -----------------------
def _cut(text: str, n: int = _QUOTE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _system(constitution_text: str) -> list[dict]:
    head = (constitution_text + "\n\n") if constitution_text else ""
    return [{"role": "system", "content": head + "Above is your constitution: who you are and how you talk. "
                                                 "Now you look back at one of your own replies."}]


def _what_happened(question: str, served: str, reasons: tuple[str, ...], scenario: bool) -> str:
    said = f"Someone wrote to you: \"{_cut(question)}\"\nYou replied: \"{_cut(served)}\"\n"
    if scenario:
        return said + "Read your reply again against your constitution."
    why = f" and said why: {', '.join(REASONS.get(r, r) for r in reasons)}" if reasons else ""
    return said + f"They pressed 👎 (they did not like it){why}."


def critique_messages(constitution_text: str, question: str, served: str, reasons: tuple[str, ...] = (), *,
                      scenario: bool = False) -> list[dict]:
    """Ask for a critique of the served reply, judged by the constitution."""
    return _system(constitution_text) + [{"role": "user", "content": (
        _what_happened(question, served, reasons, scenario)
        + "\nIn one or two sentences, say what was wrong with your reply, judged by your constitution.")}]


def word_budget(served: str, reasons: tuple[str, ...]) -> int | None:
    """For a 👎 "too long": at most half the served reply's words (at least MIN_WORDS); else None.

    Why: "too long" is the one reason that says what the rewrite must be, and a small model asked to
    do better writes as long again (session 16: 17 of 18 rewrites of the packaged 135M model broke
    the 30-word rule they were written for). So the rewrite is asked for in so many words, and its
    decode is capped near them (`within_budget` keeps its whole sentences)."""
    if not any(REASONS.get(r, r) == REASONS["long"] for r in reasons):
        return None
    return max(MIN_WORDS, len(served.split()) // 2)


def within_budget(text: str, words: int, *, cut: bool) -> tuple[str | None, str | None]:
    """(the rewrite, None) when it is whole and at most `words` words; else cut back to its last whole
    sentence within them; (None, "cut_off") when no whole sentence fits. `cut`: the decode stopped at
    its cap, so what follows the last sentence end is unfinished."""
    if len(text.split()) <= words and not cut:
        return text, None
    ends = [end for end in sentence_ends(text) if len(text[:end].split()) <= words]
    if not ends:
        return None, "cut_off"
    return text[:ends[-1]].strip(), None


def refine_messages(constitution_text: str, question: str, served: str, critique: str,
                    reasons: tuple[str, ...] = (), *, scenario: bool = False, words: int | None = None) -> list[dict]:
    """Ask for the reply it should have given: the hindsight (the first reply, its 👎, the critique) goes
    after the constitution, then the person's message comes again, so the model simply answers it — a
    small model copies a quoted critique when asked to "write the reply", but answers a question.
    `words`: the word budget of a "too long" rewrite (`word_budget`)."""
    head = (constitution_text + "\n\n") if constitution_text else ""
    if scenario:
        verdict = "Read against your constitution, it fell short"
    else:
        why = f" ({', '.join(REASONS.get(r, r) for r in reasons)})" if reasons else ""
        verdict = f"The person pressed 👎{why}"
    return [{"role": "system", "content": (
        head + f"You are answering the next message a second time. Your first reply was: \"{_cut(served)}\"\n"
        f"{verdict}. What was wrong with it: {critique}\nAnswer again, better, as yourself"
        + (f", in at most {words} words." if words else "."))},
        {"role": "user", "content": question}]


# --- reading what the model wrote -------------------------------------------------------------
_LABEL = re.compile(r"^\s*(?:\*\*|#+\s*)?(?:critique|what was wrong(?: with it)?|better(?: reply)?|refined(?: reply)?"
                    r"|improved(?: reply)?|reply|answer|response|assistant|ouro)\s*(?:\*\*)?\s*[:：-]\s*(?:\*\*)?\s*",
                    re.IGNORECASE)
_ROLE_LINE = re.compile(r"(?im)^\s*(?:<\|im_(?:start|end)\|>|\[?(?:user|human|assistant|system)\]?\s*[:：]|"
                        r"(?:user|assistant|system)\s*$)")
_ECHO = re.compile(r"(?i)\b(?:your constitution|judged by|pressed 👎|what was wrong with (?:it|your reply)|"
                   r"the reply you should have given|someone wrote to you|you replied:)"
                   r"|👎\s*\(")          # the verdict as the prompt writes it: "👎 (too long)"
_QUOTES = "\"'“”«»`"


def _strip(text: str) -> str:
    text = text.replace("<|im_end|>", "\n").strip()
    for _ in range(2):                          # "Better reply: **…**" → "…"
        text = _LABEL.sub("", text, count=1).strip()
    m = _ROLE_LINE.search(text)                 # the other side's line, or a new turn: the reply ended before it
    if m:
        text = text[: m.start()].strip()
    if text.startswith("**") and text.endswith("**") and len(text) > 4:   # the whole reply in bold
        text = text[2:-2].strip()
    elif text.endswith("**") and text.count("**") == 1:                   # its opening went with the label
        text = text[:-2].strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def clean_critique(text: str, constitution_text: str = "") -> tuple[str | None, str | None]:
    """(critique, None), or (None, why it was dropped): no words, or the constitution recited. Labels
    and anything from another speaker's line on are cut off first."""
    text = _strip(text)
    if len(text) < 8 or not re.search(r"[^\W\d_]{2}", text):
        return None, "empty_critique"
    if constitution_text and _same(text[:40], " ".join(constitution_text.split())[:40]):
        return None, "echo"
    return _cut(text, _CRITIQUE_CHARS), None


def clean_reply(text: str, served: str, *, max_chars: int, critique: str = "") -> tuple[str | None, str | None]:
    """(the refined reply, None), or (None, why it was dropped): empty, the served reply (or the
    critique) again, an echo of the instructions, or too long to be a target. Labels, wrapping quotes
    and anything from another speaker's line on (a model writing the whole conversation) are cut off."""
    text = _strip(text)
    if len(text) < 2 or not re.search(r"[^\W\d_]", text):
        return None, "empty"
    if _same(text, served):
        return None, "same_as_served"
    if critique and (_same(text, critique) or _same(text[: len(critique)], critique)):
        return None, "same_as_critique"
    if _ECHO.search(text):
        return None, "echo"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


# --- the step -----------------------------------------------------------------------------------
@dataclass
class RefineReport:
    generation_id: str | None = None
    made: int = 0                                        # proposals stored
    kept_unreviewed: int = 0                             # of them, kept at once (an admin's own chat)
    dropped: dict = field(default_factory=dict)          # why a botched output was not stored -> count
    tried: dict = field(default_factory=dict)            # {"thumbs_down": n, "scenario": n}
    proposals: list = field(default_factory=list)        # {id, kind, turn_id, question, critique, refined}
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"generation_id": self.generation_id, "made": self.made, "kept_unreviewed": self.kept_unreviewed,
                "dropped": dict(self.dropped), "dropped_total": sum(self.dropped.values()), "tried": dict(self.tried),
                "proposals": list(self.proposals), "wall_s": self.wall_s}


def write_proposals(settings: Settings, store: Store, writer: Writer, *, generation_id: str | None,
                    turns: int | None = None, scenarios: int | None = None) -> RefineReport:
    """Critique and rewrite up to `turns` lone 👎'd replies and `scenarios` new scenarios with `writer`;
    store each good result as a proposal. Deterministic for one writer and one store."""
    started = time.perf_counter()
    report = RefineReport(generation_id=generation_id)
    dropped: Counter = Counter()
    text = constitution(settings)
    screens = screens_for(settings)
    max_chars = screens.max_chars if screens is not None else 1200
    n_turns = settings.refine_per_cycle if turns is None else turns
    n_scen = settings.refine_scenarios if scenarios is None else scenarios
    candidates = store.refine_candidates(limit=n_turns, opt_out_by_default=settings.training_opt_out_default)
    done = store.proposed_scenarios()
    todo = [q for q in load_scenarios(settings.refine_scenarios_file) if q not in done][:n_scen] if n_scen else []
    report.tried = {"thumbs_down": len(candidates), "scenario": len(todo)}

    def one(question: str, served: str, reasons: tuple[str, ...], scenario: bool) -> tuple[str, str] | None:
        try:
            raw = writer.greedy_reply(critique_messages(text, question, served, reasons, scenario=scenario),
                                      max_tokens=min(CRITIQUE_TOKENS, settings.refine_max_tokens)).text
            critique, why = clean_critique(raw, text)
            if critique is None:
                dropped[why] += 1
                return None
            words = None if scenario else word_budget(served, reasons)
            cap = settings.refine_max_tokens
            if words is not None:
                cap = min(cap, int(words * TOKENS_PER_WORD) + 8)
            out = writer.greedy_reply(refine_messages(text, question, served, critique, reasons, scenario=scenario,
                                                      words=words), max_tokens=cap)
        except OuroError as exc:             # the prompt does not fit the context: this one is skipped
            log.info("self-refinement skipped an item: %s", exc)
            dropped["prompt_too_long"] += 1
            return None
        refined, why = clean_reply(out.text, served, max_chars=max_chars, critique=critique)
        if refined is not None and words is not None:
            refined, why = within_budget(refined, words, cut=out.finish_reason == "length")
        if refined is None:
            dropped[why] += 1
            return None
        flagged = screen(refined, screens) if screens is not None else []
        if flagged:
            dropped["screened"] += 1
            return None
        return critique, refined

    for c in candidates:
        got = one(c.user_text, c.reply, c.reasons, False)
        if got is None:
            continue
        kept_by = c.user_id if settings.refine_admin_skip_review and settings.is_admin(c.user_id) else None
        pid = store.add_proposal("thumbs_down", turn_id=c.turn_id, served=c.reply, critique=got[0], refined=got[1],
                                 reasons=c.reasons, generation_id=generation_id, kept_by=kept_by)
        if pid is not None:
            report.made += 1
            report.kept_unreviewed += kept_by is not None
            report.proposals.append({"id": pid, "kind": "thumbs_down", "turn_id": c.turn_id, "question": c.user_text,
                                     "served": c.reply, "critique": got[0], "refined": got[1]})
    served_with = [{"role": "system", "content": text}] if text else []
    for question in todo:
        try:
            served = writer.greedy_reply(served_with + [{"role": "user", "content": question}],
                                         max_tokens=settings.refine_max_tokens).text.strip()
        except OuroError:
            dropped["prompt_too_long"] += 1
            continue
        if not served:
            dropped["empty_served"] += 1
            continue
        got = one(question, served, (), True)
        if got is None:
            continue
        pid = store.add_proposal("scenario", prompt=question, served=served, critique=got[0], refined=got[1],
                                 generation_id=generation_id)
        if pid is not None:
            report.made += 1
            report.proposals.append({"id": pid, "kind": "scenario", "turn_id": None, "question": question,
                                     "served": served, "critique": got[0], "refined": got[1]})
    report.dropped = dict(sorted(dropped.items()))
    report.wall_s = round(time.perf_counter() - started, 2)
    if report.made or dropped:
        store.log_event("refine", detail={k: v for k, v in report.to_dict().items() if k != "proposals"})
    return report


class GreedyWriter:
    """A GGUF through llama.cpp, greedy with the serving repeat penalty (as evals.scoring.EvalModel
    generates), without the evals' logits at every position."""

    def __init__(self, gguf: Path, *, generation_id: str, n_ctx: int, n_threads: int | None,
                 repeat_penalty: float, n_gpu_layers: int = 0) -> None:
        from engine.llama import LlamaEngine

        self.engine = LlamaEngine(gguf, generation_id=generation_id, n_ctx=n_ctx, n_threads=n_threads,
                                  n_gpu_layers=n_gpu_layers, kv_cache_chats=0)
        self.repeat_penalty = repeat_penalty

    def greedy_reply(self, messages: list[dict], max_tokens: int = 96):
        from engine.protocol import Sampling

        sampling = Sampling(temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=self.repeat_penalty, seed=0,
                            max_tokens=max_tokens)
        self.engine.llm.reset()
        return self.engine.generate(messages, chat_key="refine", sampling=sampling)

    def close(self) -> None:
        self.engine.close()


def refine_with_gguf(settings: Settings, store: Store, gguf: Path, *, generation_id: str | None,
                     turns: int | None = None, scenarios: int | None = None) -> RefineReport:
    """`write_proposals` with `gguf` (the active generation's) loaded through llama.cpp."""
    n_turns = settings.refine_per_cycle if turns is None else turns
    n_scen = settings.refine_scenarios if scenarios is None else scenarios
    if n_turns <= 0 and n_scen <= 0:
        return RefineReport(generation_id=generation_id)
    from evals.scoring import cycle_gpu_layers

    writer = GreedyWriter(gguf, generation_id=generation_id or "refine", n_ctx=min(settings.n_ctx, 4096),
                          n_threads=settings.n_threads, repeat_penalty=settings.repeat_penalty,
                          n_gpu_layers=cycle_gpu_layers(settings, gguf))
    try:
        return write_proposals(settings, store, writer, generation_id=generation_id, turns=turns, scenarios=scenarios)
    finally:
        writer.close()
