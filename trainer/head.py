"""The LM head on chosen positions, in chunks: log-probabilities (and a KL to a reference) that
never hold a whole [positions, vocabulary] float32 tensor under autograd.

With a 49k-token vocabulary one position's logits are 192 KB in float32; a DPO batch of eight
384-token sequences read through the model's own forward holds 600 MB per copy of them, and
autograd keeps several copies (logits, log-softmax, their gradients). The training passes here
read the head only where a reply token is, `CHUNK` positions at a time, each chunk (when there
are several) under activation checkpointing: the forward keeps only the chunk's hidden states (d floats a position),
the backward recomputes that chunk's logits, so the peak is one chunk's logits, whatever the
number of positions. The head's matmul runs twice for reply positions; measured in
docs/design-notes.md (Training memory and precision).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = 256   # positions per LM-head chunk: 256 × 49152 float32 logits = 48 MB


def _logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _logps_kl(head, hidden: torch.Tensor, targets: torch.Tensor, ref_hidden: torch.Tensor, free_below: float):
    logits = head(hidden).float()
    logp = logits.log_softmax(-1)
    with torch.no_grad():
        ref = head(ref_hidden).float().log_softmax(-1)
        held = ref.gather(-1, targets[:, None]).squeeze(-1) >= math.log(free_below) if free_below > 0 else None
    per_row = (ref.exp() * (ref - logp)).sum(-1)
    kl = (per_row[held] if held is not None else per_row).sum()
    return logp.gather(-1, targets[:, None]).squeeze(-1), kl


def _run(fn, *args, whole: bool):
    """fn(*args), checkpointed when autograd would otherwise keep the vocabulary-sized insides of
    several chunks; one chunk (`whole`) runs plainly: its logits are what a chunk costs anyway, and
    recomputing them made a step on a delta of short chats ~17% slower."""
    if not whole and torch.is_grad_enabled() and args[1].requires_grad:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, *, chunk: int = CHUNK) -> torch.Tensor:
    """log p(target_i | hidden_i) for each row i of hidden [n, d] and targets [n] (float32, [n])."""
    if not len(targets):
        return hidden.new_zeros(0, dtype=torch.float32)
    whole = len(targets) <= chunk
    return torch.cat([_run(_logps, head, hidden[i:i + chunk], targets[i:i + chunk], whole=whole)
                      for i in range(0, len(targets), chunk)])


def token_logps_and_kl(head, hidden: torch.Tensor, targets: torch.Tensor, ref_hidden: torch.Tensor, *,
                       free_below: float = 0.0, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps, and the sum over rows of KL(ref ‖ model) between the next-token distributions that
    `ref_hidden` (no gradient) and `hidden` give through the same head — over the rows whose target
    the reference gives at least `free_below` probability (0: every row)."""
    parts, kl = [], hidden.new_zeros((), dtype=torch.float32)
    whole = len(targets) <= chunk
    for i in range(0, len(targets), chunk):
        logp, part = _run(_logps_kl, head, hidden[i:i + chunk], targets[i:i + chunk], ref_hidden[i:i + chunk],
                          free_below, whole=whole)
        parts.append(logp)
        kl = kl + part
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), kl


def sequence_logps(hidden: torch.Tensor, head, targets: torch.Tensor, keep: torch.Tensor, *,
                   chunk: int = CHUNK) -> torch.Tensor:
    """Per sequence, the sum of log p(target) over the positions `keep` marks.

    hidden [b, t, d] (already shifted: position i predicts targets[:, i]), targets and keep [b, t]."""
    logps = token_logps(head, hidden[keep], targets[keep], chunk=chunk)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(hidden.shape[0], device=hidden.device, dtype=logps.dtype).index_add(0, rows, logps)
