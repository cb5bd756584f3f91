"""Fine-tuning stage: LoRA SFT on packed rows, then DPO on preference pairs, then merge and save.

    base_dir (HF checkpoint, full precision) ──► LoRA on q,k,v,o,gate,up,down
        ──► SFT: a plain loop over packed rows (trainer.dataset), loss on replies only, ≤ 1024 tokens a forward on the CPU
        ──► DPO (trainer/dpo.py) on the same adapter; the frozen reference is the SFT adapter
        ──► KTO on lone 👍/👎 (trainer/kto.py) on the same adapter; the reference is the model so far
        ──► merge_and_unload, checked: merged logits == adapter logits
        ──► out_dir: merged model + tokenizer (+ training.json), written under a temp name and renamed

Why a plain loop and not trl's SFTTrainer, and why LoRA dropout is off by default: faster on
CPU by measurement (docs/design-notes.md).

The base is read in `TrainConfig.precision` (trainer/precision.py resolves the train_precision
setting): float32 on the CPU by default; on CUDA 4-bit nf4 (QLoRA), whose adapter is then merged
into a bf16 copy of the base on the GPU (merging into 4-bit weights would round them), or bf16,
merged as it stands. The merged checkpoint keeps that dtype (bf16 after nf4/bf16 training).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from core.errors import OuroError
from engine.template import ChatFormat, Message
from trainer import dpo as dpo_pass
from trainer.dataset import (
    IGNORE_INDEX,
    DPOPair,
    Encoded,
    EncodedPair,
    PackedRow,
    collate_packed,
    encode_all,
    encode_pairs,
    pack,
)
from trainer.distributed import SINGLE, Group
from trainer.head import token_logps, token_logps_and_kl
from trainer.kto import KTOItem, encode_items, kto_train
from trainer.peak import peak_gpu_mb, peak_rss_mb, reset_peak_rss, reset_peaks

# Llama/Qwen/Gemma/Mistral projections, and Phi-3's fused qkv_proj / gate_up_proj
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj"]


class TrainConfigError(OuroError, ValueError):
    """A training setting out of range; the message names the field."""


@dataclass
class TrainConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank r (≥ 1)."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA input, in [0, 1). 0 by default: on CPU it costs ~25% of the step time."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the SFT pass."})
    epochs: int = field(default=2, metadata={"help": "Passes over the SFT examples when the data is large enough."})
    min_steps: int = field(default=16, metadata={
        "help": "A small delta still gets this many SFT optimizer steps: more passes (up to max_epochs), "
                "then smaller batches."})
    max_epochs: int = field(default=8, metadata={"help": "Most passes over a small delta."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop SFT after this many steps (None: as planned)."})
    lr_schedule: str = field(default="cosine", metadata={
        "help": "constant, or cosine (linear warm-up over the first 10% of steps, then cosine decay to 0)."})
    batch: int = field(default=4, metadata={"help": "Packed rows per SFT step; preference pairs per DPO step."})
    max_seq_len: int = field(default=1024, metadata={"help": "Tokens per packed row (and per DPO sequence)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO temperature beta: how far from the SFT model."})
    dpo_steps: int = field(default=20, metadata={"help": "Most DPO optimizer steps (0: skip DPO)."})
    dpo_epochs: int = field(default=4, metadata={
        "help": "Passes over the preference pairs: the DPO pass takes ceil(dpo_epochs x pairs / batch) steps, "
                "at most dpo_steps."})
    dpo_max_len: int = field(default=384, metadata={
        "help": "Tokens per DPO (and KTO) sequence: a pair's prompt keeps its newest exchanges within this. Which "
                "reply is better rarely depends on the start of a long chat, and DPO reads every pair twice per step."})
    dpo_lr: float = field(default=1e-4, metadata={"help": "Learning rate of the DPO pass."})
    dpo_nll_weight: float = field(default=0.0, metadata={
        "help": "RPO: weight of the mean negative log-likelihood of the chosen replies added to the DPO loss, "
                "so both replies' likelihood cannot fall together (trainer/dpo.py). 0: plain DPO."})
    dpo_kl_beta: float = field(default=1.0, metadata={
        "help": "Weight of the KL(parent ‖ model) at the chosen reply's tokens in the DPO pass, with kl_free_below "
                "as in SFT: the parent's words held while the preference is learned (trainer/dpo.py). 0: off."})
    kto_steps: int = field(default=20, metadata={"help": "Most KTO optimizer steps on lone 👍/👎 (0: skip KTO)."})
    kto_epochs: int = field(default=1, metadata={
        "help": "Passes over the lone ratings: the KTO pass takes ceil(kto_epochs x items / kto_batch) steps, "
                "at most kto_steps."})
    kto_batch: int = field(default=2, metadata={
        "help": "Items per KTO step (≥ 2 gives the KL estimate a mismatched reply; small keeps memory low)."})
    kto_beta: float = field(default=0.1, metadata={"help": "KTO temperature beta: how far from the model before it."})
    kto_lr: float = field(default=1e-4, metadata={"help": "Learning rate of the KTO pass."})
    kl_beta: float = field(default=0.0, metadata={
        "help": "Weight of a KL term holding the next-token distribution at the reply tokens to the parent's "
                "(the adapter switched off): the taught token still wins, the rest keeps the parent's shape. "
                "Costs one more forward per step; 0: off."})
    kl_free_below: float = field(default=0.0, metadata={
        "help": "Positions whose target token the parent gives less than this probability are left out of the "
                "KL term: what the data teaches anew (a correction's new opening) is learned in full, what the "
                "parent already says is held. 0: the KL term at every reply token."})
    seed: int = field(default=1234, metadata={"help": "Seed for LoRA init, shuffling and dropout."})
    micro_tokens: int | None = field(default=None, metadata={
        "help": "Most tokens per forward within an SFT step: its rows are read in groups this long (a longer "
                "row alone), gradients accumulated, the loss exactly the step's. None: 1024 on the CPU, where one "
                "forward over 4 rows of ~750 tokens peaked at 10.7 GB of RAM for the 135M model; the whole step "
                "on a GPU."})
    precision: str = field(default="float32", metadata={
        "help": "nf4 (4-bit QLoRA, CUDA only), bf16 or float32: the base's number format while training "
                "(trainer/precision.py resolves the train_precision setting to one of these)."})

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise TrainConfigError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.rank, int) and self.rank >= 1, "rank", "an integer ≥ 1")
        need(self.alpha > 0, "alpha", "> 0")
        need(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        need(self.lr > 0, "lr", "> 0")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer ≥ 1")
        need(isinstance(self.min_steps, int) and self.min_steps >= 1, "min_steps", "an integer ≥ 1")
        need(isinstance(self.max_epochs, int) and self.max_epochs >= self.epochs, "max_epochs", "an integer ≥ epochs")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "constant or cosine")
        need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
             "max_steps", "None or an integer ≥ 1")
        need(isinstance(self.batch, int) and self.batch >= 1, "batch", "an integer ≥ 1")
        need(isinstance(self.max_seq_len, int) and self.max_seq_len >= 16, "max_seq_len", "an integer ≥ 16")
        need(self.dpo_beta > 0, "dpo_beta", "> 0")
        need(isinstance(self.dpo_steps, int) and self.dpo_steps >= 0, "dpo_steps", "an integer ≥ 0")
        need(isinstance(self.dpo_epochs, int) and self.dpo_epochs >= 1, "dpo_epochs", "an integer ≥ 1")
        need(isinstance(self.dpo_max_len, int) and self.dpo_max_len >= 16, "dpo_max_len", "an integer ≥ 16")
        need(self.dpo_lr > 0, "dpo_lr", "> 0")
        need(0 <= self.dpo_nll_weight <= 100, "dpo_nll_weight", "in [0, 100]")
        need(0 <= self.dpo_kl_beta <= 100, "dpo_kl_beta", "in [0, 100]")
        need(isinstance(self.kto_steps, int) and self.kto_steps >= 0, "kto_steps", "an integer ≥ 0")
        need(isinstance(self.kto_epochs, int) and self.kto_epochs >= 1, "kto_epochs", "an integer ≥ 1")
        need(isinstance(self.kto_batch, int) and self.kto_batch >= 1, "kto_batch", "an integer ≥ 1")
        need(self.kto_beta > 0, "kto_beta", "> 0")
        need(self.kto_lr > 0, "kto_lr", "> 0")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer ≥ 0")
        need(0 <= self.kl_beta <= 100, "kl_beta", "in [0, 100]")
        need(0 <= self.kl_free_below < 1, "kl_free_below", "in [0, 1)")
        need(self.precision in ("nf4", "bf16", "float32"), "precision", "nf4, bf16 or float32")
        need(self.micro_tokens is None or (isinstance(self.micro_tokens, int) and self.micro_tokens >= 1),
             "micro_tokens", "None or an integer ≥ 1")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass
class TrainResult:
    loss_start: float            # SFT loss of the first batch, before any update
    loss_end: float              # SFT loss of the last batch
    steps: int                   # SFT optimizer steps
    tokens: int                  # tokens the SFT pass ran through (prompt + reply, padding excluded)
    tokens_per_s: float          # tokens / SFT loop wall time
    wall_s: float                # the whole call
    peak_rss_mb: float           # peak resident memory during the call
    examples: int = 0            # SFT examples used (after dropping those whose reply alone overflows)
    chats: int = 0               # what they were read as: conversations whose reviewed turns are all targets
    epochs: int = 0              # passes over the rows (plan_run)
    batch: int = 0               # rows per optimizer step (plan_run)
    dropped: int = 0
    trimmed: int = 0             # examples whose oldest exchanges were dropped to fit max_seq_len
    rows: int = 0                # packed rows per epoch
    row_fill: float = 0.0        # mean share of max_seq_len a packed row holds
    target_tokens: int = 0       # reply tokens the SFT loss covered (per pass over the data)
    trained_tensors_changed: float = 0.0  # share of trainable tensors that SFT+DPO changed
    dpo_pairs: int = 0           # preference pairs used (after dropping those that cannot fit)
    dpo_dropped: int = 0
    dpo_steps: int = 0
    dpo_loss_start: float | None = None
    dpo_loss_end: float | None = None
    dpo_margin_start: float | None = None  # mean log p(chosen) − log p(rejected) over the pairs, before DPO
    dpo_margin_end: float | None = None
    kto_desirable: int = 0       # lone 👍 items the KTO pass used (after dropping those that cannot fit)
    kto_undesirable: int = 0     # lone 👎 items it used
    kto_dropped: int = 0
    kto_steps: int = 0
    kto_loss_start: float | None = None
    kto_loss_end: float | None = None
    kto_margin_end: float | None = None   # mean log-ratio vs the pass's start, desirable minus undesirable
    merge_max_abs_diff: float = 0.0
    losses: list[float] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)
    stage_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    stage_peak_gpu_mb: dict[str, float] = field(default_factory=dict)   # only where CUDA is
    precision: str = "float32"   # what the base was trained in (TrainConfig.precision)


class _Stages:
    """Wall time and peak memory (RSS; GPU when there is one) of each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def run(self, name: str):
        reset_peaks()
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.peak_mb[name] = round(peak_rss_mb(), 1)
        gpu = peak_gpu_mb()
        if gpu is not None:  # pragma: no cover - needs CUDA
            self.peak_gpu_mb[name] = gpu


# --- model ---------------------------------------------------------------------------------
def load_base(base_dir: Path, *, quantize_4bit: bool = False, dtype: torch.dtype = torch.float32,
              device: int = 0):
    """(model, tokenizer) from an HF checkpoint in `dtype` (on GPU `device` when there is one), or 4-bit
    nf4 on that GPU for QLoRA (CUDA only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(base_dir) / "config.json").exists():
        raise OuroError(f"{base_dir} holds no model checkpoint (config.json is missing)")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if quantize_4bit:  # pragma: no cover - needs CUDA and bitsandbytes
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif torch.cuda.is_available():  # pragma: no cover - needs CUDA
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": 0})
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False
    return model, tokenizer


DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
BF16_MERGE_RTOL = 0.02   # merge_checked's allowance for a merge in bf16, a share of the largest logit


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=LORA_TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def reply_loss(model, batch: dict[str, torch.Tensor], *, kl_beta: float = 0.0,
               kl_free_below: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over labelled positions; the LM head runs only where a label is, in
    checkpointed chunks (trainer/head.py), so no [tokens, vocabulary] float32 tensor is held whole.

    With `label_weights` in the batch (the contributors' tier weights, `train(weights=…)`), each
    labelled token's loss is scaled by its weight and divided by the plain token count: weights
    normalized to a mean of 1 over the data keep the step size, and an admin's reply (3.0) pulls
    three times as hard as a stranger's (1.0) whatever else shares its batch.
    With `kl_beta` > 0 on a peft model, plus kl_beta × the mean KL(parent ‖ model) over the same
    positions; the parent is the same weights with the adapter switched off, so it costs one forward
    without gradients and no second model in memory. With `kl_free_below` > 0 the KL is summed only
    where the parent gives the target at least that probability (still divided by all the positions):
    forward KL pulls each position towards (target + kl_beta × parent) / (1 + kl_beta), which at a
    position the parent thinks nearly impossible holds the taught token to ~1/(1 + kl_beta) and slows
    it down; there the data, not the parent, should decide (docs/design-notes.md, the KL ablation).
    Works for an HF causal LM and for a peft model around one (LoRA sits inside the decoder).
    """
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    device = _device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label_weights")}
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    n = max(int(keep.sum()), 1)
    head = lm.get_output_embeddings()
    if kl_beta > 0 and isinstance(model, PeftModel):
        with torch.no_grad(), model.disable_adapter():
            ref_hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        logps, kl = token_logps_and_kl(head, hidden[:, :-1][keep], targets[keep], ref_hidden,
                                       free_below=kl_free_below)
    else:
        logps, kl = token_logps(head, hidden[:, :-1][keep], targets[keep]), None
    if "label_weights" in batch:
        logps = logps * batch["label_weights"][:, 1:].to(device)[keep]
    loss = -logps.sum() / n
    if kl is not None:
        loss = loss + kl_beta * kl / n
    return loss, int(keep.sum())


@dataclass(frozen=True)
class RunPlan:
    """How long the SFT pass runs, sized to the data."""

    batch: int      # packed rows per optimizer step
    epochs: int     # passes over the rows
    steps: int      # optimizer steps


def plan_run(n_rows: int, cfg: TrainConfig) -> RunPlan:
    """`cfg.epochs` passes of `cfg.batch` rows — unless that gives fewer than `cfg.min_steps` steps:
    a small delta (a handful of chats) then gets more passes, up to `cfg.max_epochs`, and after
    that smaller batches, until it reaches `min_steps`. Two passes over three chats are two
    optimizer steps, which teach a LoRA adapter nothing visible (README: the learning figures)."""
    if n_rows < 1:
        raise OuroError("nothing to train on: no packed rows")
    batch = min(cfg.batch, n_rows)

    def shape(b: int) -> tuple[int, int]:
        per = math.ceil(n_rows / b)
        epochs = cfg.epochs if per * cfg.epochs >= cfg.min_steps else \
            min(cfg.max_epochs, math.ceil(cfg.min_steps / per))
        return per, epochs

    per, epochs = shape(batch)
    while per * epochs < cfg.min_steps and batch > 1:
        batch -= 1
        per, epochs = shape(batch)
    steps = per * epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return RunPlan(batch=batch, epochs=epochs, steps=steps)


def rows_for(encoded: Sequence, cfg: TrainConfig) -> list[PackedRow]:
    """Packed rows of at most `cfg.max_seq_len` tokens — unless that leaves a small delta too few
    rows to reach `cfg.min_steps` within `cfg.max_epochs`: then rows only as long as its longest
    example, so each chat gets its own optimizer steps (with one row a step nothing is padded)."""
    rows = pack(encoded, cfg.max_seq_len)
    if plan_run(len(rows), cfg).steps < cfg.min_steps:
        rows = pack(encoded, max(len(e) for e in encoded))
    return rows


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based) of `total`."""
    if schedule == "constant" or total <= 1:
        return 1.0
    warmup = max(1, round(0.1 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


CPU_MICRO_TOKENS = 1024


def groups(rows: Sequence[PackedRow], budget: int) -> list[list[PackedRow]]:
    """Consecutive rows in groups of at most `budget` tokens (a longer row alone)."""
    out: list[list[PackedRow]] = []
    for row in rows:
        if out and sum(len(r) for r in out[-1]) + len(row) <= budget:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def accumulate_step(model, rows: Sequence[PackedRow], pad_id: int, kl_beta: float, micro_tokens: int,
                    kl_free_below: float = 0.0) -> float:
    """Backward of one step's reply loss over `rows`, at most `micro_tokens` tokens a forward; returns the loss.

    reply_loss is a sum over labelled tokens divided by their count, so each part's loss, rescaled
    by its share of the step's labelled tokens, adds up to exactly the loss of the whole step. Small
    rows still share a forward: one row a forward was 25% slower on a delta of short chats."""
    parts = groups(rows, micro_tokens)
    if len(parts) == 1:
        loss, _ = reply_loss(model, collate_packed(rows, pad_id), kl_beta=kl_beta, kl_free_below=kl_free_below)
        loss.backward()
        return loss.item()
    total_n = sum(sum(label != IGNORE_INDEX for label in r.labels[1:]) for r in rows) or 1
    total = 0.0
    for part in parts:
        loss, n = reply_loss(model, collate_packed(part, pad_id), kl_beta=kl_beta, kl_free_below=kl_free_below)
        if not n:
            continue
        scaled = loss * (n / total_n)
        scaled.backward()
        total += scaled.item()
    return total


@dataclass
class SFTStats:
    losses: list[float]
    steps: int
    tokens: int
    seconds: float
    plan: RunPlan | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def sft_train(model, rows: Sequence[PackedRow], cfg: TrainConfig, pad_id: int, *, progress: bool = True,
              on_step: Callable[[int, int], None] | None = None, group: Group = SINGLE) -> SFTStats:
    """The SFT loop: shuffled packed rows, as many a step and as many steps as `plan_run` says,
    AdamW on the `cfg.lr_schedule`.

    With several processes (`group`, trainer/distributed.py) every process draws the same order and
    reads its share of each step's rows; the summed gradients are divided by the step's reply tokens
    over all processes, so a step is the one a single process takes on the whole batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    group.broadcast(params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    plan = plan_run(len(rows), cfg)
    total = plan.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg.lr_schedule))
    generator = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.micro_tokens or (plan.batch * cfg.max_seq_len if torch.cuda.is_available() else CPU_MICRO_TOKENS)
    losses: list[float] = []
    tokens = 0
    model.train()
    started = time.perf_counter()
    with tqdm(total=total, desc="SFT", unit="step", disable=not progress or not group.main) as bar:
        while len(losses) < total:
            order = torch.randperm(len(rows), generator=generator).tolist()
            for i in range(0, len(order), plan.batch):
                if len(losses) == total:
                    break
                chunk = [rows[j] for j in order[i:i + plan.batch]]
                if group.active:
                    losses.append(_shared_step(model, group.shard(chunk), params, group, pad_id, cfg.kl_beta,
                                               cfg.kl_free_below))
                else:
                    losses.append(accumulate_step(model, chunk, pad_id, cfg.kl_beta, micro, cfg.kl_free_below))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += sum(len(r) for r in chunk)
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update(1)
                if on_step is not None and group.main:
                    on_step(len(losses), total)
    return SFTStats(losses=losses, steps=len(losses), tokens=tokens, seconds=time.perf_counter() - started,
                    plan=plan)


def _shared_step(model, mine: Sequence[PackedRow], params: list, group: Group, pad_id: int,
                 kl_beta: float, kl_free_below: float = 0.0) -> float:
    """One process's part of a step: the summed loss of its rows backwards, then the gradients and
    token counts of all processes summed and divided by the step's tokens (reply_loss is a mean
    per reply token, the KL term's too, so loss × tokens is their sum). Returns the step's loss."""
    loss_sum, n = 0.0, 0
    if mine:
        loss, n = reply_loss(model, collate_packed(mine, pad_id), kl_beta=kl_beta, kl_free_below=kl_free_below)
        (loss * n).backward()
        loss_sum = loss.item() * n
    total_loss, total_n = group.reduce_grads(params, [loss_sum, n])
    group.scale_grads(params, 1.0 / max(total_n, 1.0))
    return total_loss / max(total_n, 1.0)


@torch.no_grad()
def dataset_loss(model, rows: Sequence[PackedRow], pad_id: int, batch: int = 4, *, group: Group = SINGLE) -> float:
    """Mean reply-token loss over all rows (eval mode: no dropout); with several processes each
    reads its share of the batches and the sums are combined."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in group.shard(range(0, len(rows), batch)):
        loss, n = reply_loss(model, collate_packed(rows[i:i + batch], pad_id))
        total += loss.item() * n
        count += n
    model.train(was_training)
    total, count = group.sum([total, count])
    return total / count


@torch.no_grad()
def preference_margin(model, pairs: Sequence[EncodedPair], *, group: Group = SINGLE) -> float:
    """Mean over pairs of log p(chosen | prompt) − log p(rejected | prompt), summed over reply tokens
    (with several processes, each reads its share of the pairs)."""
    was_training = model.training
    model.eval()
    margins = []
    for pair in group.shard(pairs):
        logps = []
        for reply in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + reply])
            labels = torch.tensor([[IGNORE_INDEX] * len(pair.prompt_ids) + reply])
            loss, n = reply_loss(model, {"input_ids": ids, "labels": labels})
            logps.append(-loss.item() * n)
        margins.append(logps[0] - logps[1])
    model.train(was_training)
    total, count = group.sum([sum(margins), len(margins)])
    return total / count


def dpo_train(model, tokenizer, pairs: Sequence[EncodedPair], cfg: TrainConfig, *,
              progress: bool = True) -> dict:
    """The DPO pass on the peft model as it stands (trainer/dpo.py); the reference is the SFT adapter."""
    del progress   # a short pass; the cycle's status file shows the stage
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dpo_pass.dpo_train(model, pairs, cfg, pad_id)


@torch.no_grad()
def max_logit_diff(model_a, model_b, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two models' logits on one batch (eval mode)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    a = model_a(**{k: v.to(_device(model_a)) for k, v in inputs.items()}, use_cache=False).logits.float().cpu()
    b = model_b(**{k: v.to(_device(model_b)) for k, v in inputs.items()}, use_cache=False).logits.float().cpu()
    return (a - b).abs().max().item()


@torch.no_grad()
def merge_checked(peft_model, batch: dict[str, torch.Tensor], *, atol: float = 1e-3, rtol: float = 0.0):
    """Merge the adapter into the base weights and check the logits did not move.

    Returns (merged model, max |Δlogit|); raises OuroError when the difference exceeds
    atol + rtol × max |logit|. float32: atol 1e-3, rtol 0 — on the 135M model float32 re-association
    alone moves logits (magnitude ~20) by ~1e-4. bf16 (BF16_MERGE_RTOL): rounding W + BA to bf16's
    8-bit mantissa moves the logits of a tiny Llama by ~0.5% of their largest value.
    """
    peft_model.eval()
    inputs = {k: v.to(_device(peft_model)) for k, v in batch.items() if k != "labels"}
    before = peft_model(**inputs, use_cache=False).logits.float().cpu()
    merged = peft_model.merge_and_unload()
    merged.eval()
    after = merged(**inputs, use_cache=False).logits.float().cpu()
    diff = (before - after).abs().max().item()
    allowed = atol + rtol * before.abs().max().item()
    if not diff <= allowed:
        raise OuroError(f"merging the adapter changed the logits by up to {diff:.3g} (allowed {allowed:.3g})")
    return merged, diff


def normalized(weights: Sequence[float] | None) -> list[float] | None:
    """None when there is nothing to weight (absent, or all the same); else the weights as given."""
    if weights is None or len(set(weights)) <= 1:
        return None
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise OuroError("example weights must be positive numbers")
    return [float(w) for w in weights]


def mean_one(encoded: list[Encoded]) -> list[Encoded]:
    """Scale the examples' label weights so they average 1.0 over all target tokens."""
    if not any(e.weights for e in encoded):
        return encoded
    labelled = [w for e in encoded
                for w, label in zip(e.weights or [1.0] * len(e), e.labels, strict=True) if label != IGNORE_INDEX]
    mean = sum(labelled) / len(labelled)
    return [replace(e, weights=tuple(w / mean for w in e.weights)) if e.weights
            else replace(e, weights=tuple(1.0 / mean for _ in e.labels)) for e in encoded]


def _full_precision_with_adapter(peft_model, base_dir: Path):  # pragma: no cover - QLoRA path, needs CUDA
    """The trained adapter on a bf16 copy of the base on the GPU, for the merge after 4-bit training
    (merging into 4-bit weights would round them). Not float32 on the CPU: for a 7B base that copy
    took 43 GB of RAM; bf16 on the GPU is the precision the adapter was trained against."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="ouro-adapter-") as tmp:
        peft_model.save_pretrained(tmp)
        torch.cuda.empty_cache()
        base, _ = load_base(base_dir, dtype=torch.bfloat16)
        return PeftModel.from_pretrained(base, tmp)


def _trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _share_changed(model, snapshot: dict[str, torch.Tensor]) -> float:
    params = dict(model.named_parameters())
    changed = sum(not torch.equal(params[n].detach(), v) for n, v in snapshot.items() if n in params)
    return changed / max(len(snapshot), 1)


# --- the stage -----------------------------------------------------------------------------
def train(base_dir: Path, sft_examples: Sequence[Sequence[Message]], dpo_pairs: Sequence[DPOPair],
          out_dir: Path, cfg: TrainConfig, progress: bool = True, *,
          chat_format: ChatFormat | None = None,
          on_step: Callable[[int, int], None] | None = None,
          weights: Sequence[float] | None = None, kto_items: Sequence[KTOItem] = (),
          group: Group = SINGLE) -> TrainResult:
    """Fine-tune the checkpoint in base_dir and save the merged model into out_dir.

    `chat_format` is the parent GGUF's template (`ChatFormat.from_gguf`); by default the one
    the checkpoint's tokenizer carries (saved from that GGUF). out_dir must not exist yet.
    `weights`: one SFT loss weight per example (memory/trust.py's tier weights), normalized here to
    a mean of 1 over the target tokens; None or all equal: the plain mean loss.
    `kto_items`: lone ratings for the KTO pass after DPO (trainer/kto.py), each with its own weight.
    `group`: this process's place when several train together (trainer/train_job.py launches them):
    each reads its share of every batch; only the main process merges, saves and reports progress.
    """
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise OuroError(f"{out_dir} already exists; a finished checkpoint is never overwritten")
    if not sft_examples:
        raise OuroError("no SFT examples to train on")
    stages = _Stages()
    reset_peak_rss()

    quantized = cfg.precision == "nf4"
    with stages.run("load"):
        model, tokenizer = load_base(base_dir, quantize_4bit=quantized, device=group.local_rank,
                                     dtype=DTYPES.get(cfg.precision, torch.float32))
        fmt = chat_format or ChatFormat.from_tokenizer(tokenizer)
        model = add_lora(model, cfg)
        snapshot = _trainable_snapshot(model)
    with stages.run("encode"):
        encoded, dropped = encode_all(sft_examples, tokenizer, fmt, cfg.max_seq_len, normalized(weights))
        if not encoded:
            raise OuroError(f"every SFT example's reply is longer than max_seq_len={cfg.max_seq_len}")
        encoded = mean_one(encoded)
        rows = rows_for(encoded, cfg)
        pairs, dpo_dropped = encode_pairs(dpo_pairs, tokenizer, fmt, cfg.dpo_max_len)
        rated, kto_dropped = encode_items(kto_items, tokenizer, fmt, cfg.dpo_max_len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with stages.run("sft"):
        sft = sft_train(model, rows, cfg, pad_id, progress=progress, on_step=on_step, group=group)
    dpo: dict = {"steps": 0, "loss_start": None, "loss_end": None}
    margin_start = margin_end = None
    main = group.main
    if pairs and cfg.dpo_steps and group.active:
        # trl's DPOTrainer sets up its own accelerate state and cannot share this group's steps: the
        # main process finishes the stage alone (DPO, KTO, merge, save), the others stop here
        group = group.leave()
    if pairs and cfg.dpo_steps and main:
        with stages.run("dpo"):
            margin_start = preference_margin(model, pairs[:32], group=group)
            dpo = dpo_train(model, tokenizer, pairs, cfg, progress=progress and group.main)
            margin_end = preference_margin(model, pairs[:32], group=group)
    kto: dict = {"steps": 0, "loss_start": None, "loss_end": None, "margin_end": None, "desirable": 0,
                 "undesirable": 0}
    if rated and cfg.kto_steps and (main or group.active):
        with stages.run("kto"):
            kto = kto_train(model, rated, cfg, pad_id, group=group)
    changed = _share_changed(model, snapshot)
    del snapshot
    merged, diff = None, 0.0
    if main:   # the other processes hold the same adapter: one merge and one save
        with stages.run("merge"):
            if quantized:  # pragma: no cover - QLoRA path, needs CUDA
                model = _full_precision_with_adapter(model, base_dir)
            merged, diff = merge_checked(model, collate_packed(rows[:1], pad_id),
                                         rtol=0.0 if cfg.precision == "float32" else BF16_MERGE_RTOL)
    result = TrainResult(
        loss_start=sft.losses[0], loss_end=sft.losses[-1], steps=sft.steps, tokens=sft.tokens,
        tokens_per_s=round(sft.tokens_per_s, 1), wall_s=0.0, peak_rss_mb=0.0, examples=len(sft_examples) - dropped,
        chats=len(encoded), epochs=sft.plan.epochs, batch=sft.plan.batch,
        dropped=dropped, trimmed=sum(e.trimmed for e in encoded), rows=len(rows),
        row_fill=round(sum(len(r) for r in rows) / (len(rows) * cfg.max_seq_len), 3),
        target_tokens=sum(e.n_target for e in encoded), trained_tensors_changed=round(changed, 3),
        dpo_pairs=len(pairs), dpo_dropped=dpo_dropped, dpo_steps=dpo["steps"], dpo_loss_start=dpo["loss_start"], dpo_loss_end=dpo["loss_end"],
        dpo_margin_start=margin_start, dpo_margin_end=margin_end, kto_desirable=kto["desirable"],
        kto_undesirable=kto["undesirable"], kto_dropped=kto_dropped, kto_steps=kto["steps"],
        kto_loss_start=kto["loss_start"], kto_loss_end=kto["loss_end"], kto_margin_end=kto["margin_end"],
        merge_max_abs_diff=diff, losses=sft.losses)
    if main:
        with stages.run("save"):
            tokenizer.chat_template = fmt.template  # the next generation renders with the same template
            _save(merged, tokenizer, out_dir, result, cfg, started, stages)
    result.stage_s, result.stage_peak_rss_mb = stages.seconds, stages.peak_mb
    result.stage_peak_gpu_mb, result.precision = stages.peak_gpu_mb, cfg.precision
    result.peak_rss_mb = max(stages.peak_mb.values())
    result.wall_s = round(time.perf_counter() - started, 2)
    return result


def _save(model, tokenizer, out_dir: Path, result: TrainResult, cfg: TrainConfig, started: float,
          stages: _Stages) -> None:
    """Write into a sibling temp folder, training.json last, then rename into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"config": asdict(cfg), "result": asdict(result), "stage_s": dict(stages.seconds),
                  "wall_s_before_save": round(time.perf_counter() - started, 2)}
        (staging / "training.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
