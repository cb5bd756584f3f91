"""KTO pass: lone 👍/👎 ratings (memory/export.py `Rated`) as unpaired preferences, after SFT and DPO.

KTO (Ethayarajh et al. 2024) needs no pair: each reply is desirable or not, and the loss pushes its
log-likelihood ratio against a fixed reference above (desirable) or below (undesirable) a running
estimate of the policy's KL from that reference:

    r = log π(y|x) − log π_ref(y|x)      z = max(0, mean over the batch of r on mismatched (x, y'))
    desirable: λD · w · (1 − σ(β (r − z)))       undesirable: λU · w · (1 − σ(β (z − r)))

Why this is written on the SFT loop's pieces and not trl's `KTOTrainer` (trl 1.16 has it as
`trl.KTOTrainer`; `trl.experimental.kto` only re-exports it with a deprecation warning):
- every item carries its contributor's tier weight (memory/trust.py), as SFT examples do; trl's
  KTO has only one weight per class;
- memory: trl runs the LM head over every position of every sequence, for the policy, the
  reference and the KL batch — the full-vocabulary logits that make the DPO pass cost GBs on the
  CPU. Here the head runs only on reply tokens (as trainer.finetune.reply_loss does), so a step
  holds (reply tokens × vocabulary) floats, not (sequence × vocabulary) per pass;
- the reference is the model as it stands when the pass starts (SFT, then DPO): its
  log-likelihoods of every item and of every mismatched KL item are read once, without
  gradients, before the first step (trl's precompute_ref_log_probs), so no second adapter or
  model is held. For that the batches are fixed: the items are shuffled once (seeded) and each
  epoch walks the same batches; the KL item of a batch's i-th prompt is the (i−1)-th reply.
A batch of one has no mismatched reply: its z is 0 (KTO's reference point without the KL term).
With several processes (trainer/distributed.py) each reads its share of every batch, reference and
KL items included; z and the loss are then sums over all processes divided by the batch's size.
λD and λU balance the classes as the KTO paper advises (λD·nD / λU·nU = 1): the rarer class
counts more, so a generation of a hundred 👍 and three 👎 still moves on the 👎s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.dataset import IGNORE_INDEX, DPOPair, encode_pair
from trainer.distributed import SINGLE, Group


class KTOItem(NamedTuple):
    """An unpaired preference: the context (ending with the user's message), a reply, wanted or not."""

    prompt: list[dict]
    completion: str
    desirable: bool
    weight: float = 1.0


@dataclass(frozen=True)
class EncodedItem:
    prompt_ids: list[int]
    completion_ids: list[int]     # through the end-of-turn token
    desirable: bool
    weight: float = 1.0


def encode_items(items: Sequence[KTOItem], tokenizer, fmt, max_len: int) -> tuple[list[EncodedItem], int]:
    """Render and tokenize as DPO pairs are (a reply paired with itself: the same prompt trimming and ids);
    returns (encoded, number dropped because even the newest exchange does not fit max_len)."""
    out = []
    for item in items:
        pair = encode_pair(DPOPair(item.prompt, item.completion, item.completion), tokenizer, fmt, max_len)
        if pair is not None:
            out.append(EncodedItem(pair.prompt_ids, pair.chosen_ids, bool(item.desirable), float(item.weight)))
    return out, len(items) - len(out)


def kto_steps(n_items: int, cfg) -> int:
    """`cfg.kto_epochs` passes over the items in batches of `cfg.kto_batch`, at most `cfg.kto_steps` (0: no KTO)."""
    if not n_items or not cfg.kto_steps:
        return 0
    return min(cfg.kto_steps, math.ceil(cfg.kto_epochs * n_items / min(cfg.kto_batch, n_items)))


def sequence_logps(model, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Sum of log p(reply token) per (prompt ids, reply ids) sequence; the LM head runs on reply tokens only."""
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, reply) in enumerate(seqs):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(reply)
    hidden = lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                              use_cache=False).last_hidden_state
    targets = labels[:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(seqs), device=device, dtype=token_logps.dtype).index_add(0, rows, token_logps)


def _share_logps(model, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """sequence_logps, or an empty tensor when this process holds no sequence of the batch."""
    return sequence_logps(model, seqs, pad_id) if seqs else torch.zeros(0)


def _batches(items: Sequence[EncodedItem], size: int, seed: int) -> list[list[EncodedItem]]:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[items[j] for j in order[i:i + size]] for i in range(0, len(order), size)]


def _mismatched(batch: list[EncodedItem]) -> list[tuple[list[int], list[int]]]:
    """Each prompt with the previous item's reply (rotated by one): the KL estimate's sample."""
    return [(item.prompt_ids, batch[i - 1].completion_ids) for i, item in enumerate(batch)]


@torch.no_grad()
def _logps(model, batches: list[list[EncodedItem]], pad_id: int,
           group: Group = SINGLE) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(matched, mismatched) log-likelihoods of this process's share of each batch, as the model
    stands (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for b in batches:
        matched = _share_logps(model, [(i.prompt_ids, i.completion_ids) for i in group.shard(b)], pad_id)
        out.append((matched, _share_logps(model, group.shard(_mismatched(b)), pad_id) if len(b) > 1 else None))
    model.train(was_training)
    return out


def reward_margin(model, items: Sequence[EncodedItem], reference: dict, pad_id: int, seed: int, *,
                  group: Group = SINGLE) -> float | None:
    """Mean log-ratio (model vs reference) of the desirable items minus that of the undesirable ones;
    0 at the start of the pass; None when one class is missing. With several processes `items` are
    this process's and the sums are combined."""
    batches = _batches(items, 8, seed)
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for b, (now, _) in zip(batches, _logps(model, batches, pad_id), strict=True):
        for item, logp in zip(b, now.tolist(), strict=True):
            ratios[item.desirable].append(logp - reference[id(item)])
    wanted, n_wanted, unwanted, n_unwanted = group.sum(
        [sum(ratios[True]), len(ratios[True]), sum(ratios[False]), len(ratios[False])])
    if not n_wanted or not n_unwanted:
        return None
    return wanted / n_wanted - unwanted / n_unwanted


def kto_train(model, items: Sequence[EncodedItem], cfg, pad_id: int, *, group: Group = SINGLE) -> dict:
    """The KTO pass on the peft model as it stands (its adapter keeps training); returns what it did."""
    started = time.perf_counter()
    batches = _batches(items, min(cfg.kto_batch, len(items)), cfg.seed)
    reference = _logps(model, batches, pad_id, group)
    ref_of = {id(item): logp for b, (m, _) in zip(batches, reference, strict=True)
              for item, logp in zip(group.shard(b), m.tolist(), strict=True)}
    n_wanted = sum(i.desirable for i in items)
    n_unwanted = len(items) - n_wanted
    lam = {True: 1.0, False: 1.0}
    if n_wanted and n_unwanted:   # the rarer class counts more: λD·nD = λU·nU, mean λ over the items 1
        lam = {True: len(items) / (2 * n_wanted), False: len(items) / (2 * n_unwanted)}
    mean_w = sum(i.weight for i in items) / len(items)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.kto_lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in range(kto_steps(len(items), cfg)):
        k = step % len(batches)
        if group.active:
            losses.append(_shared_step(model, batches[k], reference[k], lam, mean_w, params, cfg, pad_id, group))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            continue
        b, (ref, ref_kl) = batches[k], reference[k]
        policy = sequence_logps(model, [(i.prompt_ids, i.completion_ids) for i in b], pad_id)
        z = torch.zeros((), device=policy.device)
        if ref_kl is not None:
            with torch.no_grad():
                z = (sequence_logps(model, _mismatched(b), pad_id) - ref_kl.to(policy.device)).mean().clamp(min=0)
        ratio = policy - ref.to(policy.device)
        wanted = torch.tensor([i.desirable for i in b], device=policy.device)
        per = torch.where(wanted, 1 - torch.sigmoid(cfg.kto_beta * (ratio - z)),
                          1 - torch.sigmoid(cfg.kto_beta * (z - ratio)))
        scale = torch.tensor([lam[i.desirable] * i.weight / mean_w for i in b], device=policy.device)
        loss = (per * scale).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    mine = [item for b in batches for item in group.shard(b)]
    margin = reward_margin(model, mine, ref_of, pad_id, cfg.seed, group=group)
    return {"steps": len(losses), "loss_start": losses[0] if losses else None,
            "loss_end": losses[-1] if losses else None, "margin_end": margin,
            "desirable": n_wanted, "undesirable": n_unwanted, "seconds": round(time.perf_counter() - started, 2)}


def _shared_step(model, batch: list[EncodedItem], reference: tuple[torch.Tensor, torch.Tensor | None],
                 lam: dict[bool, float], mean_w: float, params: list, cfg, pad_id: int, group: Group) -> float:
    """One process's part of a KTO step on its share of `batch`: z from the KL items of all processes,
    this share's summed loss backwards, then the gradients summed over the processes and divided by
    the batch's size (the single-process loss is a mean over the batch). Returns the step's loss."""
    mine = group.shard(batch)
    ref, ref_kl = reference
    z = 0.0
    if ref_kl is not None:
        with torch.no_grad():
            kl = _share_logps(model, group.shard(_mismatched(batch)), pad_id)
            (kl_sum,) = group.sum([float((kl - ref_kl.to(kl.device)).sum())])
        z = max(kl_sum / len(batch), 0.0)
    local = 0.0
    if mine:
        policy = sequence_logps(model, [(i.prompt_ids, i.completion_ids) for i in mine], pad_id)
        ratio = policy - ref.to(policy.device)
        wanted = torch.tensor([i.desirable for i in mine], device=policy.device)
        per = torch.where(wanted, 1 - torch.sigmoid(cfg.kto_beta * (ratio - z)),
                          1 - torch.sigmoid(cfg.kto_beta * (z - ratio)))
        scale = torch.tensor([lam[i.desirable] * i.weight / mean_w for i in mine], device=policy.device)
        loss = (per * scale).sum()
        loss.backward()
        local = loss.item()
    (total,) = group.reduce_grads(params, [local])
    group.scale_grads(params, 1.0 / len(batch))
    return total / len(batch)
