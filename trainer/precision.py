"""Which number format the training stages run in, decided once at the start of a cycle.

    auto     on CUDA, what fits the card: bf16 when the base's bf16 weights take at most a third of
             the card's free memory (no 4-bit rounding under the adapter, and faster), else nf4
             (QLoRA: 4-bit base, bf16 compute) with bitsandbytes; without bitsandbytes bf16 while
             it fits, and a model too big for bf16 is refused before any work, naming the fix.
             float32 on the CPU
    nf4      needs CUDA and bitsandbytes: refused with the fix before any work, never an
             ImportError in the middle of a cycle; a model too big for the card even in 4-bit
             (~0.6 bytes a parameter) is refused too
    bf16     anywhere (on most CPUs slower than float32: few have bf16 matrix units); on a card
             too small for the weights, refused before any work
    float32  anywhere

The decision is a pure function of the machine's facts (`choose`) so every branch is testable
without a GPU; `resolve` reads them from this machine and the base model's file.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import OuroError

log = logging.getLogger(__name__)

CHOICES = ("auto", "nf4", "bf16", "float32")
RESOLVED = ("nf4", "bf16", "float32")
CUDA_FIX = "pip install '.[cuda]' (or `make setup`) on the GPU machine"


@dataclass(frozen=True)
class Precision:
    name: str               # nf4 | bf16 | float32
    note: str | None = None  # why auto chose less than it could, for the log


# bf16 LoRA needs the weights plus activations, the adapter and its optimizer: the weights may take
# this much of the card's free memory; auto prefers bf16 over 4-bit while they take at most ROOMY
FITS, ROOMY = 0.75, 1 / 3
GB = 1e9


def choose(requested: str, *, has_cuda: bool, has_bnb: bool, params: int | None = None,
           card_free: int | None = None) -> Precision:
    """The precision to train in, from the setting and what this machine has: CUDA, bitsandbytes,
    and where known the base model's parameter count and the card's free memory in bytes."""
    if requested not in CHOICES:
        raise OuroError(f"unknown train_precision {requested!r}", hint=f"one of: {', '.join(CHOICES)}")
    known = has_cuda and params is not None and card_free is not None
    bf16_bytes = 2 * (params or 0)
    if requested == "auto":
        if not has_cuda:
            return Precision("float32")
        if known and bf16_bytes <= ROOMY * card_free:
            return Precision("bf16")
        if has_bnb:
            if known:
                _refuse_past_card(NF4_BYTES_PER_PARAM * params, "even in 4-bit", params, card_free, hint=NF4_HINT)
            return Precision("nf4")
        if known:
            _refuse_past_card(bf16_bytes, "in bf16", params, card_free, hint=f"4-bit QLoRA would fit: {CUDA_FIX}")
        return Precision("bf16", note="training in bf16 on the GPU: bitsandbytes is not installed, so 4-bit "
                                      f"QLoRA (less GPU memory) is off; for it, {CUDA_FIX}")
    if requested == "bf16" and known:
        _refuse_past_card(bf16_bytes, "in bf16", params, card_free,
                          hint="set OURO_TRAIN_PRECISION=auto or nf4 (4-bit QLoRA)")
    if requested == "nf4" and not has_cuda:
        raise OuroError("train_precision nf4 (4-bit QLoRA) needs an NVIDIA GPU with CUDA, and this machine has none",
                        hint="set OURO_TRAIN_PRECISION=auto (float32 on the CPU), or train on the GPU machine "
                             f"after {CUDA_FIX}")
    if requested == "nf4" and not has_bnb:
        raise OuroError("train_precision nf4 (4-bit QLoRA) needs bitsandbytes, which is not installed",
                        hint=f"{CUDA_FIX}; or set OURO_TRAIN_PRECISION=bf16")
    if requested == "nf4" and known:
        _refuse_past_card(NF4_BYTES_PER_PARAM * params, "even in 4-bit", params, card_free, hint=NF4_HINT)
    return Precision(requested)


# 4-bit weights with their scales, plus the embeddings and head bitsandbytes leaves in bf16: about
# this many bytes a parameter for the models people bring (a 7B: ~4.4 GB)
NF4_BYTES_PER_PARAM = 0.6
NF4_HINT = "a smaller base model, or free the card (the bot's own offloaded layers count: OURO_N_GPU_LAYERS)"


def _refuse_past_card(needed: float, how: str, params: int, card_free: int, *, hint: str) -> None:
    """Refuse before any work when the weights alone (`needed` bytes) leave training no room."""
    if needed > FITS * card_free:
        raise OuroError(f"the base model's {params / 1e9:.1f}B parameters take {needed / GB:.1f} GB {how}, more "
                        f"than training fits in the {card_free / GB:.1f} GB free on this GPU", hint=hint)


def base_dtype(precision: str) -> str:
    """The dtype generation 0's dequantized weights are kept in: bfloat16 for a cycle that trains in
    nf4 or bf16 (it reads them so anyway; a 7B: 15 GB on disk instead of 30), else float32."""
    return "bfloat16" if precision in ("nf4", "bf16") else "float32"


def has_bitsandbytes() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except Exception:   # not installed, or installed without a working native library
        return False
    return True


def gguf_parameters(path: Path) -> int:
    """Parameters in a GGUF (every tensor's elements), from its header alone."""
    from engine.gguf import scan_gguf

    return sum(math.prod(dims) for dims, _ in scan_gguf(path).tensors.values())


def resolve(requested: str, base: Path | None = None) -> Precision:
    """`choose` with this machine's facts (the card's free memory now: a model the bot serves from
    the card takes its share) and `base`'s size; logs auto's note."""
    import torch

    has_cuda = torch.cuda.is_available()
    params = card_free = None
    if has_cuda and base is not None:
        params = gguf_parameters(base)
        card_free = torch.cuda.mem_get_info()[0]
    # bitsandbytes is only asked about where it could be used: importing it costs seconds
    chosen = choose(requested, has_cuda=has_cuda, has_bnb=has_cuda and has_bitsandbytes(), params=params,
                    card_free=card_free)
    if chosen.note:
        log.warning(chosen.note)
    return chosen
