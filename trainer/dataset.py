"""Chat examples → token ids and labels for fine-tuning, packed into rows; preference pairs for DPO.

An SFT example is the rolling context a reply was served with plus the reply: a list of
{"role", "content"} messages ending with the assistant's message. Its prompt is rendered with
the model's own chat template (`trainer.template`) and tokenized exactly as llama_engine does
at serving time, so the model trains on the very ids it will be prompted with. The loss
covers only the final reply and its end-of-turn token (`<|im_end|>` for ChatML): the model
learns to answer and to stop, never to write the user's side.

Packing: examples are placed first-fit-decreasing into rows of at most `max_seq_len` tokens;
an example is never split across rows. Positions restart at 0 for every example, and no
attention mask is passed, so transformers (≥ 4.53, here 5.23) derives a block-diagonal
causal mask from the position ids for sdpa and eager attention: tokens attend only within
their own example (`masking_utils.find_packed_sequence_indices`). The padding at the end of
a batch's shorter rows is one more "example" with its own positions and no labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ouro.errors import OuroError
from trainer.template import ChatFormat, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One example: prompt ids then reply ids; labels are IGNORE_INDEX except the reply + end token."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False   # the oldest prompt tokens were cut to fit max_seq_len

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class DPOPair(NamedTuple):
    """A preference: the context (ending with the user's message) and two replies to it."""

    prompt: list[Message]
    chosen: str
    rejected: str


def end_of_turn_token(tokenizer) -> str:
    """The token that ends an assistant turn (what serving stops on): ChatML's, else EOS."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>"
    if tokenizer.eos_token is None:
        raise OuroError("the tokenizer has neither <|im_end|> nor an EOS token: cannot tell where a reply ends")
    return tokenizer.eos_token


def tokenize(tokenizer, fmt: ChatFormat, text: str) -> list[int]:
    """Ids of a rendered text, as llama.cpp's `tokenize(..., add_bos=fmt.add_bos, special=True)` gives them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if fmt.add_bos:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def split_reply(fmt: ChatFormat, prompt: Sequence[Message], reply: str, end_token: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, reply text through its end-of-turn token)."""
    head = fmt.render(prompt, add_generation_prompt=True)
    full = fmt.render([*prompt, {"role": "assistant", "content": reply}], add_generation_prompt=False)
    if not full.startswith(head):
        raise OuroError("the chat template renders the prompt differently once a reply follows it; "
                        "cannot separate the reply from its context")
    tail = full[len(head):]
    end = tail.find(end_token, len(reply.rstrip()))
    if end < 0:
        raise OuroError(f"the chat template does not end an assistant turn with {end_token!r}")
    return head, tail[: end + len(end_token)]


def encode_sft(messages: Sequence[Message], tokenizer, fmt: ChatFormat, max_seq_len: int) -> Encoded | None:
    """Ids and labels of one example; None when even its reply alone does not fit max_seq_len."""
    if not messages or messages[-1].get("role") != "assistant":
        raise OuroError("a training example must end with the assistant's reply")
    head, reply = split_reply(fmt, messages[:-1], messages[-1]["content"], end_of_turn_token(tokenizer))
    prompt_ids = tokenize(tokenizer, fmt, head)
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + reply_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + reply_ids
    if len(ids) <= max_seq_len:
        return Encoded(ids, labels)
    if len(reply_ids) >= max_seq_len:
        return None
    return Encoded(ids[-max_seq_len:], labels[-max_seq_len:], truncated=True)


def encode_all(examples: Sequence[Sequence[Message]], tokenizer, fmt: ChatFormat,
               max_seq_len: int) -> tuple[list[Encoded], int]:
    """Encode every example; returns (encoded, number dropped because their reply alone overflows)."""
    out = []
    for i, messages in enumerate(examples):
        try:
            enc = encode_sft(messages, tokenizer, fmt, max_seq_len)
        except OuroError as exc:
            raise OuroError(f"training example {i}: {exc}") from exc
        if enc is not None:
            out.append(enc)
    return out, len(examples) - len(out)


@dataclass
class PackedRow:
    """Several whole examples laid end to end; positions restart at 0 for each."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: Encoded) -> None:
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += range(len(example))
        self.lengths.append(len(example))


def pack(examples: Sequence[Encoded], max_seq_len: int) -> list[PackedRow]:
    """First-fit-decreasing bin packing into rows of at most max_seq_len tokens; never splits an example."""
    rows: list[PackedRow] = []
    for example in sorted(examples, key=len, reverse=True):
        if len(example) > max_seq_len:
            raise ValueError(f"an example of {len(example)} tokens exceeds max_seq_len={max_seq_len}")
        row = next((r for r in rows if len(r) + len(example) <= max_seq_len), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.add(example)
    return rows


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """A [batch, longest row] batch: input_ids, labels, position_ids — and deliberately no attention_mask."""
    width = max(len(r) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        gap = width - len(r)
        ids.append(r.input_ids + [pad_id] * gap)
        labels.append(r.labels + [IGNORE_INDEX] * gap)
        pos.append(r.position_ids + list(range(gap)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def collate_padded(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """The usual alternative: one example per row, right-padded to the longest, with an attention mask."""
    width = max(len(e) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        gap = width - len(e)
        ids.append(e.input_ids + [pad_id] * gap)
        labels.append(e.labels + [IGNORE_INDEX] * gap)
        mask.append([1] * len(e) + [0] * gap)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def dpo_records(pairs: Sequence[DPOPair], tokenizer, fmt: ChatFormat) -> list[dict[str, str]]:
    """Preference pairs as trl's plain-text DPO format: prompt rendered with the generation prompt,
    chosen/rejected = reply text through the end-of-turn token (so trl adds no second EOS)."""
    end = end_of_turn_token(tokenizer)
    records = []
    for i, pair in enumerate(pairs):
        if not pair.prompt or pair.prompt[-1].get("role") != "user":
            raise OuroError(f"preference pair {i}: its prompt must end with the user's message")
        prompt, chosen = split_reply(fmt, pair.prompt, pair.chosen, end)
        _, rejected = split_reply(fmt, pair.prompt, pair.rejected, end)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def encode_pair(pair: DPOPair, tokenizer, fmt: ChatFormat) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen reply ids, rejected reply ids) — our own tokenization, for checks and margins."""
    end = end_of_turn_token(tokenizer)
    prompt, chosen = split_reply(fmt, pair.prompt, pair.chosen, end)
    _, rejected = split_reply(fmt, pair.prompt, pair.rejected, end)
    return (tokenize(tokenizer, fmt, prompt), tokenizer(chosen, add_special_tokens=False)["input_ids"],
            tokenizer(rejected, add_special_tokens=False)["input_ids"])
