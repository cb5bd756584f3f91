"""Which number format the training stages run in, decided once at the start of a cycle.

    auto     nf4 (QLoRA: 4-bit base, bf16 compute) on CUDA with bitsandbytes; bf16 on CUDA without
             it (noted in the log); float32 on the CPU
    nf4      needs CUDA and bitsandbytes: refused with the fix before any work, never an
             ImportError in the middle of a cycle
    bf16     anywhere (on most CPUs slower than float32: few have bf16 matrix units)
    float32  anywhere

The decision is a pure function of two facts (`choose`) so every branch is testable without a GPU;
`resolve` reads the facts from this machine.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from core.errors import OuroError

log = logging.getLogger(__name__)

CHOICES = ("auto", "nf4", "bf16", "float32")
RESOLVED = ("nf4", "bf16", "float32")
CUDA_FIX = "pip install '.[cuda]' (or `make setup`) on the GPU machine"


@dataclass(frozen=True)
class Precision:
    name: str               # nf4 | bf16 | float32
    note: str | None = None  # why auto chose less than it could, for the log


def choose(requested: str, *, has_cuda: bool, has_bnb: bool) -> Precision:
    """The precision to train in, from the setting and what this machine has."""
    if requested not in CHOICES:
        raise OuroError(f"unknown train_precision {requested!r}", hint=f"one of: {', '.join(CHOICES)}")
    if requested == "auto":
        if not has_cuda:
            return Precision("float32")
        if has_bnb:
            return Precision("nf4")
        return Precision("bf16", note="training in bf16 on the GPU: bitsandbytes is not installed, so 4-bit "
                                      f"QLoRA (less GPU memory) is off; for it, {CUDA_FIX}")
    if requested == "nf4" and not has_cuda:
        raise OuroError("train_precision nf4 (4-bit QLoRA) needs an NVIDIA GPU with CUDA, and this machine has none",
                        hint="set OURO_TRAIN_PRECISION=auto (float32 on the CPU), or train on the GPU machine "
                             f"after {CUDA_FIX}")
    if requested == "nf4" and not has_bnb:
        raise OuroError("train_precision nf4 (4-bit QLoRA) needs bitsandbytes, which is not installed",
                        hint=f"{CUDA_FIX}; or set OURO_TRAIN_PRECISION=bf16")
    return Precision(requested)


def has_bitsandbytes() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except Exception:   # not installed, or installed without a working native library
        return False
    return True


def resolve(requested: str) -> Precision:
    """`choose` with this machine's facts; logs auto's note."""
    import torch

    has_cuda = torch.cuda.is_available()
    # bitsandbytes is only asked about where it could be used: importing it costs seconds
    chosen = choose(requested, has_cuda=has_cuda, has_bnb=has_cuda and has_bitsandbytes())
    if chosen.note:
        log.warning(chosen.note)
    return chosen
