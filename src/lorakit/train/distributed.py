"""Multi-process training on PyTorch's own engine: `torchrun ... -m lorakit train distributed=ddp|fsdp2`.

ddp: each process (rank) holds a full copy of the frozen base and the adapter; DistributedDataParallel
all-reduces only the gradients of trainable (adapter) parameters.
fsdp2: `torch.distributed.fsdp.fully_shard` on every transformer block and on the root shards the
frozen base (4-bit weights too, stored in a float dtype) and the adapter over the ranks; each block is
gathered for its forward and backward, and adapter gradients are reduce-scattered. Checkpoints and the
saved adapter hold full tensors, gathered from every rank and written by rank 0, so they resume with
any world size and mode.

One optimizer step covers
`batch_size * grad_accum * world_size` rows: micro-batch k of the run (see `fit.micro_batch`) goes
to rank k % world_size, so the step reads exactly the micro-batches a single process with
`grad_accum * world_size` reads, and ends with the same adapter (up to fp32 reduction order).
Metrics, checkpoints and the saved adapter come from rank 0 only.

Devices: on CPUs the processes talk over gloo; with `device` cuda (or auto on a GPU machine) each process
takes the GPU of its LOCAL_RANK and they talk over NCCL (`process_device`, `init`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.adapters.layer import lora_layers
from lorakit.devices import model_device
from lorakit.train.loop import loss_sum

MODES = ("none", "ddp", "fsdp2")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank and number of processes (1 without distribution)."""

    rank: int = 0
    size: int = 1
    mode: str = "none"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, checkpoints and saves."""
        return self.rank == 0


SINGLE = World()  # a plain, one-process run


def launched_size() -> int:
    """How many processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """The collective backend for processes training on `device`: nccl between GPUs, gloo on CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device: torch.device, mode: str) -> torch.device:
    """The device this process trains on: under torchrun (`mode` not "none") a CUDA device means one GPU
    per process, `cuda:LOCAL_RANK`; otherwise `device` itself."""
    if mode == "none" or device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ValueError(f"process with LOCAL_RANK={local} has no GPU of its own: this machine has "
                         f"{torch.cuda.device_count()} (start at most that many processes per node, or device=cpu)")
    return torch.device("cuda", local)


def init(mode: str, device: torch.device = CPU) -> World:
    """Join the process group torchrun set up for `mode` (nccl when `device`, from `process_device`, is a
    GPU, which becomes this process's current device; gloo on CPUs), or check that a plain run was not
    launched by torchrun by mistake."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        if launched_size() > 1:
            raise ValueError(f"launched with {launched_size()} processes but distributed=none; "
                             "add distributed=ddp")
        return SINGLE
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"distributed={mode} needs a launcher: torchrun --nproc-per-node N -m lorakit train ...")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to its GPU
        dist.init_process_group(backend_for(device))
    return current(mode)


def current(mode: str) -> World:
    """The World for `mode` in an already-initialised process group (World() for "none")."""
    if mode == "none":
        return SINGLE
    if not dist.is_initialized():
        raise ValueError(f"distributed={mode} but no process group is initialised (launch with torchrun)")
    return World(dist.get_rank(), dist.get_world_size(), mode)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module the training step calls: DDP around `model`'s loss (`StepLoss`), or `model` itself
    sharded in place by FSDP2 (which replaces its parameters: build the optimizer after this), or `model`."""
    if world.mode == "fsdp2":
        return shard(model, world)
    if world.size == 1:
        return model
    device = model_device(model)
    ids = [device.index] if device.type == "cuda" else None  # one GPU per process
    return nn.parallel.DistributedDataParallel(StepLoss(model), device_ids=ids)


class StepLoss(nn.Module):
    """`loss_sum(model, batch)` as a module, for DDP to wrap: DDP's forward then runs lorakit's loss
    (the head only at supervised positions, no [tokens, vocab] logits) instead of the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch)


def shard(model: nn.Module, world: World) -> nn.Module:
    """FSDP2 in place: `fully_shard` each transformer block (the model's `_no_split_modules` classes, else
    the entries of its longest ModuleList), then the root, which takes what is left (embeddings, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(type(m).__name__.startswith("AdaLora") for m in model.modules()):
        raise ValueError("distributed=fsdp2 does not support AdaLoRA (its rank allocator reads whole "
                         "matrices); use distributed=ddp")
    mesh = init_device_mesh(model_device(model).type, (world.size,))  # cuda: each rank's current GPU
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for _, layer in lora_layers(model):  # the hidden base modules let go of the whole tensors too
        layer.sync_base_parameters()
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`, in order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"distributed=fsdp2: found no transformer blocks in {type(model).__name__}")
    return list(max(lists, key=len))


def regroup(groups: list[dict] | None, names: dict[int, str], model: nn.Module) -> list[dict] | None:
    """Optimizer parameter groups made before `wrap`, over the parameters `model` holds now (FSDP2
    replaces them); `names` maps id(parameter) to its name from before."""
    if groups is None:
        return None
    now = dict(model.named_parameters())
    return [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in groups]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `ref`: this rank's shard of it when `ref` is an FSDP2 DTensor."""
    if not isinstance(ref, DTensor):
        return value
    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def full_state(state: dict) -> dict:
    """An optimizer state dict with every FSDP2-sharded tensor gathered whole (every rank calls it)."""
    return {**state, "state": {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}}


def sharded_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `full_state` for `optimizer`: the moments of a sharded parameter become this
    rank's shards; other entries (a step count, 8-bit absmax) stay as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering

    def shard(v, p):
        return like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v

    return {**state, "state": {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}}


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its trainable FSDP2-sharded parameters replaced by whole ones while inside (every rank
    enters; the frozen base stays sharded), so that an adapter can be read and saved; nothing without FSDP2."""
    swapped = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if isinstance(p, DTensor) and p.requires_grad:
                swapped.append((module, name, p))
                module._parameters[name] = nn.Parameter(p.full_tensor())
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def micro_indices(step: int, grad_accum: int, world: World) -> list[int]:
    """The run's micro-batch numbers this rank reads at optimizer step `step`."""
    per_step = grad_accum * world.size
    return [step * per_step + i * world.size + world.rank for i in range(grad_accum)]


def all_sum(value: float, world: World) -> float:
    """Sum of a number over all ranks (the number itself without distribution)."""
    if world.size == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only (current GPU)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def finish(world: World) -> None:
    """Leave the process group once every rank is done."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sync_gradients(net: nn.Module, last: bool):
    """DDP all-reduces, FSDP2 reduce-scatters, on the last micro-batch of a step only."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and not last:
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # an FSDPModule
        net.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of `params` to total norm `max_norm`; their norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full(norm))
