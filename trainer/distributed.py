"""Training past one device: the few collective steps the training loops share.

Data parallelism, as DDP does it, reduced to what a LoRA pass needs: every process holds the whole
model, reads its share of each global batch (`Group.shard`: the same rows a single process would
read in that step, dealt out by rank), and before every optimizer step the processes sum their
adapter gradients and their reply-token counts (`Group.reduce_grads`), so each step divides by the
step's tokens across all processes — the same mean as one process over the whole batch.

Why not torch's DistributedDataParallel wrapper or accelerate's `Accelerator.prepare`: the loops
call the decoder directly (trainer/finetune.py `reply_loss` runs the LM head on reply tokens only),
which skips the wrapped module's forward that DDP hooks into; and only the adapter trains — a few
MB — so one all-reduce of its gradients per step is all the communication there is. FSDP (sharding
the frozen base itself) would only pay off for a base too large for one device; not done here.

The launcher — `python -m torch.distributed.run` (trainer/train_job.py) or `accelerate launch` —
sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `Group.from_env` joins the process group
(gloo on CPU, nccl on CUDA). One process: `SINGLE`, every method a no-op, nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from core.errors import OuroError

T = TypeVar("T")
# what torch.distributed.run / accelerate launch set for each process
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                    "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"          # where collectives run: "cpu" (gloo) or "cuda:N" (nccl)

    @property
    def active(self) -> bool:
        """More than one process: the loops shard and reduce."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that logs, reports and saves."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Group:
        """Join the process group the launcher described in the environment (SINGLE without one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SINGLE
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if cuda:  # pragma: no cover - needs several GPUs
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            if not cuda and not dist.is_gloo_available():
                raise OuroError("this torch build has no gloo backend, which multi-process training on CPU needs",
                                hint="set OURO_TRAIN_PROCESSES=1")
            dist.init_process_group(backend)
        return cls(rank=rank, world=world, local_rank=local, device=f"cuda:{local}" if cuda else "cpu")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of one global batch: every world-th item from its rank on
        (deterministic; a process may get none when the batch is smaller than the world)."""
        return list(items[self.rank::self.world])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        if not self.active:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_grads(self, params: Sequence[torch.Tensor], extra: Sequence[float] = ()) -> list[float]:
        """Sum the gradients of `params` over the processes, in one all-reduce together with
        `extra` (e.g. a loss sum and a token count), and return the summed extras. A parameter
        without a gradient (this process read no row) counts as zeros."""
        if not self.active:
            return [float(v) for v in extra]
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype = grads[0].dtype if grads else torch.float32
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.tensor([float(v) for v in extra], dtype=dtype, device=self.device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        return flat[offset:].tolist()

    def scale_grads(self, params: Sequence[torch.Tensor], factor: float) -> None:
        """Multiply every gradient by `factor` (e.g. 1 / the step's tokens over all processes)."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of `params` in every process: all processes start from the same adapter."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def leave(self) -> Group:
        """Leave the group and go on as one process (SINGLE): the process group is destroyed and the
        launcher's variables leave the environment, so a library that sets itself up from them
        (accelerate, under trl's trainers) sees a single process. For a pass that cannot be shared
        out: the main process runs it alone, the others stop."""
        self.close()
        for name in LAUNCH_VARIABLES:
            os.environ.pop(name, None)
        return SINGLE

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Group()


def check_processes(n: int, *, cores: int | None = None, cuda_devices: int | None = None,
                    gloo: bool | None = None) -> str:
    """The backend `n` training processes would use here ("single", "gloo" or "nccl"), or a clear
    OuroError when this machine cannot run them. The machine's facts are read unless given."""
    if n <= 1:
        return "single"
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if cuda_devices:
        if n > cuda_devices:
            raise OuroError(f"train_processes={n} but this machine has {cuda_devices} GPU(s): one process per GPU",
                            hint=f"set OURO_TRAIN_PROCESSES to at most {cuda_devices}")
        return "nccl"
    cores = (os.cpu_count() or 1) if cores is None else cores
    if n > cores:
        raise OuroError(f"train_processes={n} but this machine has no GPU and {cores} CPU core(s): more processes "
                        "than cores only slows training down",
                        hint=f"set OURO_TRAIN_PROCESSES to at most {cores} (1 keeps training in one process)")
    gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available() if gloo is None else gloo
    if not gloo:
        raise OuroError("train_processes > 1 on CPU needs torch's gloo backend, which this torch build lacks",
                        hint="set OURO_TRAIN_PROCESSES=1, or install a torch build with distributed support")
    return "gloo"
