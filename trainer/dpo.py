"""DPO pass: the sigmoid DPO loss (Rafailov et al. 2023) on the peft adapter, memory-bounded.

    margin = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))
    loss   = −log σ(β · margin), the mean over a batch of pairs

log π(y) is the sum of log p over the reply tokens of y given the prompt. The reference is the
model as it stands when the pass starts (the SFT adapter): its log-probabilities of every pair
are read once, without gradients, before the first step — what trl's DPOTrainer does with
`precompute_ref_log_probs` — so no second adapter or model is held.

Why not trl's DPOTrainer (which tests/test_dpo.py keeps as the reference this loop must match):
it runs the LM head over every position of every sequence, chosen and rejected concatenated, and
keeps the full-vocabulary float32 logits of the batch for the backward — gigabytes on the CPU
for the 135M model at its defaults, most of a cycle's peak memory. Here each pair (chosen and
rejected, one forward of two sequences) is a micro-batch whose gradient is accumulated — exact,
since a pair's loss term depends on that pair alone — and the head runs only on reply positions,
in checkpointed chunks (trainer/head.py).

Two anchors can join the loss, both on the chosen reply (what each bought is in docs/design-notes.md,
"What the DPO pass's recall loss was" and "Short rewrites chosen over long replies"). The KL anchor is
on by default (`dpo_kl_beta` 1.0): on a round of short rewrites chosen over long served replies, plain
DPO found the cheapest way to prefer the short ones — end every reply after a few tokens (the end of
turn at p ≥ 0.9 two or three tokens into the parent's own answers; recall 0.685) — and the anchor,
which holds the parent's next-token distribution along the chosen replies, kept recall at 0.960 (at
1.0) with the rule learned as well. On a later round at 1.0 the child lost no end of turn but
wavered on the tokens its parent was unsure of (recall 0.910; 0.984 with no DPO at all); 3.0 kept
0.954 and the rule, but refused an "Ahoy!" style round on style drift, so 1.0 stays (session 19). The two:
- `dpo_nll_weight` α: + α × the mean negative log-likelihood of the batch's chosen tokens — RPO
  (Pang et al. 2024), trl's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, α]`. DPO alone
  can lower both replies' likelihood as long as the rejected falls faster; this keeps the chosen up.
- `dpo_kl_beta` β: + β × KL(parent ‖ policy) summed over the chosen reply positions whose target the
  parent gives at least `kl_free_below`, over the batch's chosen tokens — the SFT pass's anchor
  carried on. The parent is the model with the adapter switched off; its hidden states at those
  positions are read once, before the first step, like the reference's log-probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from trainer.dataset import EncodedPair
from trainer.head import sequence_logps, token_logps, token_logps_and_kl


def _lm(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _reply_hidden(model, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """One right-padded forward of (prompt ids, reply ids) sequences: (hidden states, targets, keep), shifted
    so position t predicts targets[:, t]; `keep` marks the reply positions."""
    lm = _lm(model)
    device = next(model.parameters()).device
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    keep = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (prompt, reply) in enumerate(seqs):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        mask[i, :n] = 1
        keep[i, len(prompt):n] = True
    ids, mask = ids.to(device), mask.to(device)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return hidden[:, :-1], ids[:, 1:], keep[:, 1:].to(device)


def reply_logps(model, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Sum of log p(reply token | everything before it) for each (prompt ids, reply ids), right-padded
    into one forward; the LM head runs on reply positions only."""
    hidden, targets, keep = _reply_hidden(model, seqs, pad_id)
    return sequence_logps(hidden, _lm(model).get_output_embeddings(), targets, keep)


def pair_logps(model, pair: EncodedPair, pad_id: int) -> torch.Tensor:
    """[log π(chosen), log π(rejected)] of one pair."""
    return reply_logps(model, [(pair.prompt_ids, pair.chosen_ids), (pair.prompt_ids, pair.rejected_ids)], pad_id)


def pair_logps_and_kl(model, pair: EncodedPair, pad_id: int, parent_hidden: torch.Tensor,
                      free_below: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[log π(chosen), log π(rejected)] of one pair, and the summed KL(parent ‖ π) over the chosen reply's
    positions that `free_below` keeps (`parent_hidden`: the parent's hidden states there, parent_hiddens)."""
    hidden, targets, keep = _reply_hidden(
        model, [(pair.prompt_ids, pair.chosen_ids), (pair.prompt_ids, pair.rejected_ids)], pad_id)
    head = _lm(model).get_output_embeddings()
    chosen, kl = token_logps_and_kl(head, hidden[0][keep[0]], targets[0][keep[0]],
                                    parent_hidden.to(hidden.device, hidden.dtype), free_below=free_below)
    rejected = token_logps(head, hidden[1][keep[1]], targets[1][keep[1]])
    return torch.stack([chosen.sum(), rejected.sum()]), kl


@torch.no_grad()
def parent_hiddens(model, pairs: Sequence[EncodedPair], pad_id: int) -> list[torch.Tensor]:
    """Per pair, the parent's (adapter off) last hidden states at the chosen reply's positions, on the CPU:
    d numbers a token, so the KL anchor needs no second forward per step."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError("the DPO pass's KL anchor needs a peft model: the parent is its base with the adapter off")
    was_training = model.training
    model.eval()
    out = []
    with model.disable_adapter():
        for pair in pairs:
            hidden, _, keep = _reply_hidden(model, [(pair.prompt_ids, pair.chosen_ids)], pad_id)
            out.append(hidden[0][keep[0]].cpu())
    model.train(was_training)
    return out


@torch.no_grad()
def reference_logps(model, pairs: Sequence[EncodedPair], pad_id: int) -> torch.Tensor:
    """[pairs, 2]: the model's log-probabilities of each pair's chosen and rejected reply, as it stands (eval mode)."""
    was_training = model.training
    model.eval()
    out = torch.stack([pair_logps(model, p, pad_id).float().cpu() for p in pairs]) if pairs else torch.zeros(0, 2)
    model.train(was_training)
    return out


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Sigmoid DPO loss per pair from [pairs, 2] log-probabilities (chosen, rejected)."""
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return -F.logsigmoid(beta * margin)


def dpo_steps(n_pairs: int, cfg) -> int:
    """`cfg.dpo_epochs` passes over the pairs, at most `cfg.dpo_steps` steps (0: no DPO)."""
    if not n_pairs or not cfg.dpo_steps:
        return 0
    return min(cfg.dpo_steps, math.ceil(cfg.dpo_epochs * n_pairs / min(cfg.batch, n_pairs)))


def accumulate(model, batch: Sequence[EncodedPair], reference: torch.Tensor, beta: float, pad_id: int, *,
               nll_weight: float = 0.0, kl_beta: float = 0.0, parents: Sequence[torch.Tensor] | None = None,
               free_below: float = 0.0) -> float:
    """Backward of one step's loss over `batch`, a pair at a time; returns the loss: the mean DPO loss,
    plus the anchors (module docstring) over the batch's chosen tokens. `parents`: parent_hiddens of
    the batch's pairs, needed when kl_beta > 0."""
    total = 0.0
    chosen_tokens = sum(len(p.chosen_ids) for p in batch)
    for k, pair in enumerate(batch):
        if kl_beta > 0:
            policy, kl = pair_logps_and_kl(model, pair, pad_id, parents[k], free_below)
            policy = policy[None]
        else:
            policy, kl = pair_logps(model, pair, pad_id)[None], None
        loss = dpo_loss(policy, reference[k:k + 1].to(policy.device), beta).sum() / len(batch)
        if nll_weight > 0:
            loss = loss - nll_weight * policy[0, 0] / chosen_tokens
        if kl is not None:
            loss = loss + kl_beta * kl / chosen_tokens
        loss.backward()
        total += loss.item()
    return total


def dpo_train(model, pairs: Sequence[EncodedPair], cfg, pad_id: int, *,
              on_step=None) -> dict:
    """The DPO pass on the peft model as it stands (its adapter keeps training); returns what it did.

    `cfg.batch` pairs a step (fewer if there are fewer pairs), reshuffled each pass (seeded),
    AdamW at a constant `cfg.dpo_lr`, gradients clipped to norm 1 — trl's DPOConfig as
    trainer.finetune used it; `cfg.dpo_nll_weight` and `cfg.dpo_kl_beta` the anchors."""
    started = time.perf_counter()
    steps = dpo_steps(len(pairs), cfg)
    if not steps:
        return {"steps": 0, "loss_start": None, "loss_end": None, "seconds": 0.0}
    reference = reference_logps(model, pairs, pad_id)
    kl_beta, nll_weight = cfg.dpo_kl_beta, cfg.dpo_nll_weight
    parents = parent_hiddens(model, pairs, pad_id) if kl_beta > 0 else None
    batch = min(cfg.batch, len(pairs))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.dpo_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for i in range(0, len(order), batch):
            if len(losses) == steps:
                break
            idx = order[i:i + batch]
            losses.append(accumulate(model, [pairs[j] for j in idx], reference[idx], cfg.dpo_beta, pad_id,
                                     nll_weight=nll_weight, kl_beta=kl_beta, free_below=cfg.kl_free_below,
                                     parents=[parents[j] for j in idx] if parents is not None else None))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(len(losses), steps)
    return {"steps": len(losses), "loss_start": losses[0], "loss_end": losses[-1],
            "seconds": round(time.perf_counter() - started, 2)}
