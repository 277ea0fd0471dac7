"""Multi-process training on PyTorch's own engine: `torchrun ... -m lorakit train distributed=ddp`.

Each process (rank) holds a full copy of the frozen base and the adapter; DistributedDataParallel
all-reduces only the gradients of trainable (adapter) parameters. One optimizer step covers
`batch_size * grad_accum * world_size` rows: micro-batch k of the run (see `fit.micro_batch`) goes
to rank k % world_size, so the step reads exactly the micro-batches a single process with
`grad_accum * world_size` reads, and ends with the same adapter (up to fp32 reduction order).
Metrics, checkpoints and the saved adapter come from rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank and number of processes (1 without distribution)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, checkpoints and saves."""
        return self.rank == 0


SINGLE = World()  # a plain, one-process run


def launched_size() -> int:
    """How many processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(mode: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) for `mode`, or check
    that a plain run was not launched by torchrun by mistake."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        if launched_size() > 1:
            raise ValueError(f"launched with {launched_size()} processes but distributed=none; "
                             "add distributed=ddp")
        return SINGLE
    refuse_unimplemented(mode)
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"distributed={mode} needs a launcher: torchrun --nproc-per-node N -m lorakit train ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return current(mode)


def current(mode: str) -> World:
    """The World for `mode` in an already-initialised process group (World() for "none")."""
    if mode == "none":
        return SINGLE
    refuse_unimplemented(mode)
    if not dist.is_initialized():
        raise ValueError(f"distributed={mode} but no process group is initialised (launch with torchrun)")
    return World(dist.get_rank(), dist.get_world_size())


def refuse_unimplemented(mode: str) -> None:
    if mode == "fsdp2":
        raise ValueError("distributed=fsdp2 is not implemented yet; use distributed=ddp")


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module the training step calls: DDP around `model` when distributed, else `model`."""
    if world.size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def micro_indices(step: int, grad_accum: int, world: World) -> list[int]:
    """The run's micro-batch numbers this rank reads at optimizer step `step`."""
    per_step = grad_accum * world.size
    return [step * per_step + i * world.size + world.rank for i in range(grad_accum)]


def all_sum(value: float, world: World) -> float:
    """Sum of a number over all ranks (the number itself without distribution)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def finish(world: World) -> None:
    """Leave the process group once every rank is done."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sync_gradients(net: nn.Module, last: bool):
    """DDP all-reduces on the last micro-batch of a step only (`no_sync` before it)."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and not last:
        return net.no_sync()
    return contextlib.nullcontext()
