"""Chat examples → token ids and labels for fine-tuning, packed into rows; preference pairs for DPO.

An SFT example is the rolling context a reply was served with plus the reply: a list of
{"role", "content"} messages ending with the assistant's message. Its prompt is rendered with
the model's own chat template (`engine.template`) and tokenized exactly as llama_engine does
at serving time, so the model trains on the very ids it will be prompted with. The loss
covers only the final reply and its end-of-turn token (`<|im_end|>` for ChatML): the model
learns to answer and to stop, never to write the user's side.

Packing: examples are placed first-fit-decreasing into rows of at most `max_seq_len` tokens;
an example is never split across rows. Positions restart at 0 for every example, and no
attention mask is passed, so transformers (≥ 4.53, here 5.23) derives a block-diagonal
causal mask from the position ids for sdpa and eager attention: tokens attend only within
their own example (`masking_utils.find_packed_sequence_indices`). The padding at the end of
a batch's shorter rows is one more "example" with its own positions and no labels. Gotcha:
that detection is skipped whenever a KV cache is passed, and a forward with `use_cache=True`
(the config default) creates one, so packed forwards must say `use_cache=False`, or the
examples of a row silently attend to each other.

One chat, read once: the examples of one conversation are prefixes of each other (each turn's
context holds the replies before it, as people settled them: memory/export.py), so
`merge_conversations` folds every example that is a prefix of a longer one into it as one more
target. The model then reads the chat once instead of once per reviewed turn (a 9-turn chat:
~4x fewer tokens) and every target still sees exactly its own context — causal attention makes
the merged row compute the same loss terms as the separate examples.

Too long: an example that exceeds max_seq_len loses its oldest exchanges (the system message
stays), as serving's rolling context would have dropped them; never a cut mid-message. A target
inside a dropped exchange is encoded on its own, with the context it had.

Preference pairs become trl's plain-text DPO records, rendered with the same template, and
their ids (ours) let the trainer check that trl tokenized them identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from core.errors import OuroError
from engine.template import ChatFormat, Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One example: prompt ids then reply ids; labels are IGNORE_INDEX except the reply + end token."""

    input_ids: list[int]
    labels: list[int]
    trimmed: bool = False   # its oldest exchanges were dropped to fit max_seq_len
    weights: tuple[float, ...] | None = None   # per position, for the labelled ones; None: all 1.0

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


# End-of-turn tokens by family: ChatML, Llama 3, Gemma, Phi-3 (Mistral's [INST] ends turns with EOS)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_token(tokenizer, template: str | None = None) -> str:
    """The token that ends an assistant turn (what serving stops on): the family's end-of-turn
    token that the vocabulary holds (and `template`, when given, writes), else EOS."""
    for token in END_OF_TURN_TOKENS:
        if template is not None and token not in template:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token
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


def _drop_oldest_exchange(messages: list[Message], keep_last: int) -> bool:
    """Remove the oldest user/assistant exchange after the system message, as the rolling context does.

    Returns False when nothing but the system message and the last `keep_last` messages remain.
    """
    start = 1 if messages[0].get("role") == "system" else 0
    if len(messages) - start <= keep_last:
        return False
    del messages[start:min(start + 2, len(messages) - keep_last)]
    return True


def encode_sft(messages: Sequence[Message], tokenizer, fmt: ChatFormat, max_seq_len: int) -> Encoded | None:
    """Ids and labels of one example.

    When it is longer than max_seq_len, its oldest exchanges are dropped (the system message
    stays), the way serving's rolling context drops them; None when even the last user message
    and the reply do not fit.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise OuroError("a training example must end with the assistant's reply")
    end = end_of_turn_token(tokenizer, fmt.template)
    context, reply = list(messages[:-1]), messages[-1]["content"]
    trimmed = False
    while True:
        head, tail = split_reply(fmt, context, reply, end)
        prompt_ids = tokenize(tokenizer, fmt, head)
        reply_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(reply_ids) <= max_seq_len:
            return Encoded(prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids, trimmed)
        if not _drop_oldest_exchange(context, keep_last=1):
            return None
        trimmed = True


@dataclass
class Chat:
    """A conversation and the indexes of its assistant messages the loss covers."""

    messages: list[Message]
    targets: list[int]
    weights: dict[int, float] = field(default_factory=dict)   # target index -> loss weight (absent: 1.0)


def _key(messages: Sequence[Message]) -> tuple:
    return tuple((m.get("role"), m.get("content")) for m in messages)


def every_reply(messages: Sequence[Message]) -> list[list[Message]]:
    """An imported window as examples: the prefix ending at each of the owner's replies that answers
    a message (merge_conversations folds them back into one row with a target per reply).

    Why: every reply in an imported window is the owner's, but an example's loss is on its final
    reply only, and a window ends deep in a conversation whose earlier replies already show the
    owner's manner, so that reply learns to copy it from the context. Measured (session 14, `ouro
    experiment --imported`, defaults): 25 windows, loss on their last replies only (1,741 tokens,
    0.31 nats/token at the end), and 0% of fresh-conversation probe replies in the owner's style:
    the first reply of a conversation, which the probes ask for, was never a target. The same
    tokens are read either way; only the labels grow."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and i > 0 and messages[i - 1].get("role") == "user":
            out.append(list(messages[: i + 1]))
    return out or [list(messages)]


def merge_conversations(examples: Sequence[Sequence[Message]],
                        weights: Sequence[float] | None = None) -> list[Chat]:
    """Fold each example that is a prefix of a longer one into it (as another target); exact
    duplicates become one target (the larger weight). Longest first, so a chain of turns ends in
    one Chat. `weights`: one per example (its reply's loss weight); None: all 1.0."""
    chats: list[Chat] = []
    where: dict[tuple, Chat] = {}   # every assistant-ending prefix of a kept chat -> that chat
    weighted = list(zip(examples, weights if weights is not None else [1.0] * len(examples), strict=True))
    for messages, weight in sorted(weighted, key=lambda e: len(e[0]), reverse=True):
        if not messages or messages[-1].get("role") != "assistant":
            raise OuroError("a training example must end with the assistant's reply")
        key = _key(messages)
        target = len(messages) - 1
        chat = where.get(key)
        if chat is not None:
            if target not in chat.targets:
                chat.targets.append(target)
            if weight != 1.0 or target in chat.weights:
                chat.weights[target] = max(weight, chat.weights.get(target, weight))
            continue
        chat = Chat(list(messages), [target], {target: weight} if weight != 1.0 else {})
        chats.append(chat)
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                where.setdefault(_key(messages[: i + 1]), chat)
    for chat in chats:
        chat.targets.sort()
    return chats


def _encode_targets(messages: list[Message], targets: list[int], tokenizer, fmt: ChatFormat,
                    end: str, weights: dict[int, float] | None = None) -> tuple[list[int], list[int], list[float]]:
    """Ids, labels and per-position weights of messages[: last target + 1]: labels on each target
    reply and its end token, weighted by its target's weight."""
    ids: list[int] = []
    labels: list[int] = []
    position_weights: list[float] = []
    text = ""
    for t in targets:
        head, tail = split_reply(fmt, messages[:t], messages[t]["content"], end)
        if not head.startswith(text):
            raise OuroError("the chat template renders an earlier turn differently once later turns follow it")
        between = head[len(text):]
        seg = tokenize(tokenizer, fmt, between) if not ids else tokenizer(between, add_special_tokens=False)["input_ids"]
        reply = tokenizer(tail, add_special_tokens=False)["input_ids"]
        ids += seg + reply
        labels += [IGNORE_INDEX] * len(seg) + reply
        position_weights += [1.0] * len(seg) + [(weights or {}).get(t, 1.0)] * len(reply)
        text = head + tail
    return ids, labels, position_weights


def encode_chat(chat: Chat, tokenizer, fmt: ChatFormat, max_seq_len: int) -> tuple[list[Encoded], int]:
    """A chat as one Encoded when it fits; otherwise its oldest exchanges go (targets in them are
    encoded on their own, with their own context). Returns (encoded, targets that cannot fit)."""
    end = end_of_turn_token(tokenizer, fmt.template)
    messages, targets, weights = list(chat.messages), list(chat.targets), dict(chat.weights)
    out: list[Encoded] = []
    lost_targets, trimmed = 0, False
    start = 1 if messages and messages[0].get("role") == "system" else 0
    while True:
        ids, labels, position_weights = _encode_targets(messages, targets, tokenizer, fmt, end, weights)
        if len(ids) <= max_seq_len:
            out.append(Encoded(ids, labels, trimmed, tuple(position_weights) if weights else None))
            return out, lost_targets
        last = targets[-1]
        if last - start < 2:     # only the last question and its reply are left: it cannot fit
            return out, lost_targets + len(targets)
        cut = 2 if last - start >= 3 else last - start - 1
        gone = [t for t in targets if t < start + cut]
        if gone:
            sub, lost = encode_chat(Chat(messages[: gone[-1] + 1], gone, {t: weights[t] for t in gone if t in weights}),
                                    tokenizer, fmt, max_seq_len)
            out += sub
            lost_targets += lost
        del messages[start:start + cut]
        targets = [t - cut for t in targets if t >= start + cut]
        weights = {t - cut: w for t, w in weights.items() if t >= start + cut}
        trimmed = True


def encode_all(examples: Sequence[Sequence[Message]], tokenizer, fmt: ChatFormat,
               max_seq_len: int, weights: Sequence[float] | None = None) -> tuple[list[Encoded], int]:
    """Merge the examples into chats and encode them; returns (encoded, number of examples dropped
    because they cannot fit max_seq_len). `weights`: one loss weight per example (None: all 1.0)."""
    try:
        chats = merge_conversations(examples, weights)
    except OuroError as exc:
        raise OuroError(f"training examples: {exc}") from exc
    out, dropped = [], 0
    for i, chat in enumerate(chats):
        try:
            enc, lost = encode_chat(chat, tokenizer, fmt, max_seq_len)
        except OuroError as exc:
            raise OuroError(f"training conversation {i}: {exc}") from exc
        out += enc
        dropped += lost
    return out, dropped


@dataclass
class PackedRow:
    """Several whole examples laid end to end; positions restart at 0 for each."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    weighted: bool = False      # some example in it carries weights other than 1.0

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: Encoded) -> None:
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += range(len(example))
        self.lengths.append(len(example))
        self.weights += example.weights or [1.0] * len(example)
        self.weighted |= example.weights is not None


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
    """A [batch, longest row] batch: input_ids, labels, position_ids — and deliberately no attention_mask;
    `label_weights` too when some example in it is weighted (see `reply_loss`)."""
    width = max(len(r) for r in rows)
    ids, labels, pos, weights = [], [], [], []
    for r in rows:
        gap = width - len(r)
        ids.append(r.input_ids + [pad_id] * gap)
        labels.append(r.labels + [IGNORE_INDEX] * gap)
        pos.append(r.position_ids + list(range(gap)))
        weights.append(r.weights + [1.0] * gap)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}
    if any(r.weighted for r in rows):
        batch["label_weights"] = torch.tensor(weights)
    return batch


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


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as trl's plain-text DPO format wants it, and as ids (ours, to check trl's)."""

    prompt: str            # rendered with the generation prompt
    chosen: str            # reply text through the end-of-turn token, so trl adds no second EOS
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def encode_pair(pair: DPOPair, tokenizer, fmt: ChatFormat, max_seq_len: int) -> EncodedPair | None:
    """Render and tokenize a pair; the oldest exchanges go until prompt + longer reply fit (None if never)."""
    if not pair.prompt or pair.prompt[-1].get("role") != "user":
        raise OuroError("a preference pair's prompt must end with the user's message")
    end = end_of_turn_token(tokenizer, fmt.template)
    context = list(pair.prompt)
    while True:
        head, chosen = split_reply(fmt, context, pair.chosen, end)
        _, rejected = split_reply(fmt, context, pair.rejected, end)
        prompt_ids = tokenize(tokenizer, fmt, head)
        chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= max_seq_len:
            return EncodedPair(head, chosen, rejected, prompt_ids, chosen_ids, rejected_ids)
        if not _drop_oldest_exchange(context, keep_last=1):
            return None


def encode_pairs(pairs: Sequence[DPOPair], tokenizer, fmt: ChatFormat,
                 max_seq_len: int) -> tuple[list[EncodedPair], int]:
    """Encode every pair; returns (encoded, number dropped because they cannot fit max_seq_len)."""
    out = []
    for i, pair in enumerate(pairs):
        try:
            enc = encode_pair(DPOPair(*pair), tokenizer, fmt, max_seq_len)
        except OuroError as exc:
            raise OuroError(f"preference pair {i}: {exc}") from exc
        if enc is not None:
            out.append(enc)
    return out, len(pairs) - len(out)
