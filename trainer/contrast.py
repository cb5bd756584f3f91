"""Contrast pairs for an imported history: the owner's reply over the parent's own, same context.

Why: an imported chat teaches by imitation only (SFT), and inside a window the owner's later
replies copy their manner from the earlier ones in the context, so what separates the owner from
the base model is paid for by about one reply per window. Measured (session 13, `ouro experiment
--imported`, defaults): 25 training windows, promoted, and 0% → 0% of fresh-conversation probe
replies in the owner's style. The live loop learns the same kind of style from ~14 ✏️ pairs, each
the corrected reply over the one served. This gives an import that lesson without anyone rating:
for the owner's replies with the least of their own manner in front of them (a window's first
reply first), the parent answers the same context as users are answered (the serving sampling,
seeded), and (owner's reply chosen, parent's reply rejected) joins the DPO pass — one round of
the self-play idea of SPIN (Chen et al., 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models"). Only training windows are paired (a held-out window's reply
never is), and a reply the parent already gives word for word makes no pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from memory.export import Example, Pair
from trainer.dataset import every_reply
from trainer.refine import GreedyWriter


class Writer(Protocol):
    def reply(self, messages: list[dict], seed: int) -> str: ...


@dataclass
class ContrastReport:
    candidates: int = 0          # distinct owner replies that could be paired
    same: int = 0                # the parent said the owner's very words (or nothing): no pair
    wall_s: float = 0.0
    pairs: list[Pair] = field(default_factory=list)

    @property
    def made(self) -> int:
        return len(self.pairs)

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "made": self.made, "same": self.same, "wall_s": self.wall_s}


def candidates(examples: list[Example], limit: int) -> list[tuple[list[dict], str, str]]:
    """(prompt, owner's reply, created_at) for imported training examples: every owner reply that
    answers a message, each reply once (windows overlap: the instance with the fewest owner replies
    before it wins), fewest first, at most `limit`."""
    best: dict[str, tuple[int, int, list[dict], str, str]] = {}
    order = 0
    for e in examples:
        if e.source != "import":
            continue
        for prefix in every_reply(e.messages):
            *prompt, reply = prefix
            key = reply["content"].strip()
            if reply["role"] != "assistant" or not key or not prompt or prompt[-1]["role"] != "user":
                continue
            depth = sum(x["role"] == "assistant" for x in prompt)
            if key not in best or depth < best[key][0]:
                best[key] = (depth, order, prompt, reply["content"], e.created_at)
            order += 1
    ranked = sorted(best.values(), key=lambda x: (x[0], x[1]))
    return [(prompt, reply, at) for _, _, prompt, reply, at in ranked[:limit]]


def contrast_pairs(examples: list[Example], writer: Writer, *, limit: int, seed: int) -> ContrastReport:
    started = time.perf_counter()
    todo = candidates(examples, limit)
    report = ContrastReport(candidates=len(todo))
    for k, (prompt, chosen, at) in enumerate(todo):
        rejected = writer.reply(prompt, seed + k)
        if not rejected.strip() or rejected.strip() == chosen.strip():
            report.same += 1
            continue
        report.pairs.append(Pair(prompt=prompt, chosen=chosen, rejected=rejected, source="contrast",
                                 created_at=at, approved=True, split="train"))
    report.wall_s = round(time.perf_counter() - started, 1)
    return report


class SampledWriter(GreedyWriter):
    """Self-refinement's GGUF writer (trainer/refine.py), answering as users are answered: the
    serving sampling, seeded per reply."""

    def __init__(self, gguf: Path, *, generation_id: str, n_ctx: int, n_threads: int | None, sampling,
                 n_gpu_layers: int = 0) -> None:
        super().__init__(gguf, generation_id=generation_id, n_ctx=n_ctx, n_threads=n_threads,
                         repeat_penalty=sampling.repeat_penalty, n_gpu_layers=n_gpu_layers)
        self.sampling = sampling

    def reply(self, messages: list[dict], seed: int) -> str:
        self.engine.llm.reset()
        return self.engine.generate(messages, chat_key="contrast", sampling=replace(self.sampling, seed=seed)).text

