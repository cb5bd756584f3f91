"""Phase 0 of a cycle: a short continued-pretraining pass on the owner's documents, before SFT.

    parent (full precision) ──► LoRA ──► documents as plain text, loss on every token,
        mixed with replayed chat examples (loss on replies, as in SFT)
        ──► merge (checked) ──► out_dir: the base the cycle's SFT then starts from

Why plain text and not the chat template: a document is nobody's reply; wrapped in a chat turn
the model would learn to answer with essays. Why replay: a pass on prose alone can pull the model
away from the chat format it serves in (continuing text instead of answering: catastrophic
forgetting, not measured here), so chat examples are mixed into the same rows, about
`replay_ratio` chat tokens per document token; the pass reports their loss before and after.
Why LoRA merged into a new base rather than one adapter for both passes: the SFT stage stays
exactly as it is (trainer/finetune.py), whatever happens here.

On CUDA the model trains in float32 on the GPU (not 4-bit like SFT's QLoRA: the pass is short,
and merging into a full-precision base keeps it exact; not yet run on a GPU).

Bounded: at most `max_tokens` document tokens per pass, read once (`epochs`); the chunks left
over wait for the next cycle (the generation records the last chunk it read).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.errors import OuroError
from engine.template import ChatFormat, Message
from trainer.dataset import Encoded, collate_packed, encode_all, pack, tokenize
from trainer.distributed import SINGLE, Group
from trainer.finetune import TrainConfig, add_lora, dataset_loss, load_base, merge_checked, sft_train

EVAL_ROWS = 16   # rows the before/after losses are measured on (the pass itself reads them all)


@dataclass
class PretrainConfig:
    max_tokens: int = field(default=32768, metadata={"help": "Most document tokens one pass reads."})
    epochs: int = field(default=1, metadata={"help": "Passes over the documents read."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (cosine schedule, 10% warm-up)."})
    replay_ratio: float = field(default=0.5, metadata={"help": "Chat tokens mixed in per document token."})
    batch: int = field(default=4, metadata={"help": "Packed rows per optimizer step."})
    max_seq_len: int = field(default=1024, metadata={"help": "Tokens per packed row."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    seed: int = field(default=1234, metadata={"help": "Seed for LoRA init, replay sampling and shuffling."})

    def __post_init__(self) -> None:
        for name, ok in (("max_tokens", self.max_tokens >= 1), ("epochs", self.epochs >= 1), ("lr", self.lr > 0),
                         ("replay_ratio", 0 <= self.replay_ratio <= 10), ("batch", self.batch >= 1),
                         ("max_seq_len", self.max_seq_len >= 16)):
            if not ok:
                raise OuroError(f"PretrainConfig.{name} is out of range: {getattr(self, name)!r}")

    def train_config(self) -> TrainConfig:
        """The SFT loop's settings for this pass: exactly epochs x rows / batch steps, no minimum."""
        return TrainConfig(rank=self.rank, alpha=self.alpha, lr=self.lr, epochs=self.epochs, min_steps=1,
                           max_epochs=self.epochs, batch=self.batch, max_seq_len=self.max_seq_len, seed=self.seed)


@dataclass
class PretrainResult:
    chunks: int                   # document chunks read (the first `chunks` of those given)
    tokens: int                   # their tokens, one pass
    replay_examples: int          # chat examples mixed in
    replay_tokens: int
    steps: int
    loss_start: float             # mean loss over the documents' tokens before the pass
    loss_end: float               # … and after it (eval mode)
    chat_loss_start: float | None  # mean reply loss of the mixed-in chats, before and after
    chat_loss_end: float | None
    merge_max_abs_diff: float = 0.0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "losses"}


def encode_documents(texts: Sequence[str], tokenizer, fmt: ChatFormat, max_seq_len: int,
                     max_tokens: int) -> tuple[list[Encoded], int]:
    """(pieces of at most max_seq_len tokens with every token labelled, chunks used): each text as the
    model would read it bare (BOS as the template adds it, then EOS), taken in order until the next
    one would pass `max_tokens` (the first always counts, cut to fit)."""
    eos = tokenizer.eos_token_id
    encoded, total, used = [], 0, 0
    for text in texts:
        ids = tokenize(tokenizer, fmt, text) + ([eos] if eos is not None else [])
        if used and total + len(ids) > max_tokens:
            break
        ids = ids[: max_tokens - total] if not used else ids
        for start in range(0, len(ids), max_seq_len):
            piece = ids[start:start + max_seq_len]
            if len(piece) > 1:
                encoded.append(Encoded(input_ids=piece, labels=list(piece)))
        total += len(ids)
        used += 1
    return encoded, used


def replay_sample(chats: Sequence[Sequence[Message]], tokenizer, fmt: ChatFormat, max_seq_len: int,
                  tokens: int, seed: int) -> list[Encoded]:
    """Chat examples, encoded as SFT encodes them, in a seeded random order until `tokens` are reached."""
    if tokens <= 0 or not chats:
        return []
    encoded, _ = encode_all(list(chats), tokenizer, fmt, max_seq_len)
    random.Random(seed).shuffle(encoded)
    out, total = [], 0
    for e in encoded:
        if total >= tokens:
            break
        out.append(e)
        total += len(e)
    return out


def continue_pretraining(base_dir: Path, documents: Sequence[str], replay: Sequence[Sequence[Message]],
                         out_dir: Path, cfg: PretrainConfig, *, chat_format: ChatFormat | None = None,
                         progress: bool = False,
                         on_step: Callable[[int, int], None] | None = None,
                         group: Group = SINGLE) -> PretrainResult:
    """Train on `documents` (plain text, in order, within cfg.max_tokens) mixed with `replay` chats; save
    the merged model and its tokenizer into out_dir (which must not exist). With several processes
    (`group`) each reads its share of every batch and only the main one merges and saves."""
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise OuroError(f"{out_dir} already exists; a finished checkpoint is never overwritten")
    if not documents:
        raise OuroError("no documents to train on")
    train_cfg = cfg.train_config()
    model, tokenizer = load_base(base_dir)
    if torch.cuda.is_available():  # pragma: no cover - float32 on the GPU; the merge stays exact
        model = model.to(f"cuda:{group.local_rank}")
    fmt = chat_format or ChatFormat.from_tokenizer(tokenizer)
    docs, used = encode_documents(documents, tokenizer, fmt, cfg.max_seq_len, cfg.max_tokens)
    if not docs:
        raise OuroError("the documents hold no text to train on")
    doc_tokens = sum(len(e) for e in docs)
    chats = replay_sample(replay, tokenizer, fmt, cfg.max_seq_len, round(cfg.replay_ratio * doc_tokens), cfg.seed)
    model = add_lora(model, train_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    doc_rows, chat_rows = pack(docs, cfg.max_seq_len), pack(chats, cfg.max_seq_len) if chats else []
    rows = pack([*docs, *chats], cfg.max_seq_len)
    loss_start = dataset_loss(model, doc_rows[:EVAL_ROWS], pad_id, group=group)
    chat_start = dataset_loss(model, chat_rows[:EVAL_ROWS], pad_id, group=group) if chat_rows else None
    stats = sft_train(model, rows, train_cfg, pad_id, progress=progress, on_step=on_step, group=group)
    loss_end = dataset_loss(model, doc_rows[:EVAL_ROWS], pad_id, group=group)
    chat_end = dataset_loss(model, chat_rows[:EVAL_ROWS], pad_id, group=group) if chat_rows else None
    diff = 0.0
    if group.main:   # the other processes hold the same adapter
        merged, diff = merge_checked(model, collate_packed(rows[:1], pad_id))
        _save(merged, tokenizer, out_dir)
    return PretrainResult(chunks=used, tokens=doc_tokens, replay_examples=len(chats),
                          replay_tokens=sum(len(e) for e in chats), steps=stats.steps, loss_start=loss_start,
                          loss_end=loss_end, chat_loss_start=chat_start, chat_loss_end=chat_end,
                          merge_max_abs_diff=diff, wall_s=round(time.perf_counter() - started, 2),
                          losses=stats.losses)


def _save(model, tokenizer, out_dir: Path) -> None:
    """Write into a sibling temp folder, then rename into place: never a half-written base."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
