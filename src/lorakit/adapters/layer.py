"""The wrapper around one frozen base layer that holds named adapters.

    y = base(x) + sum over active, unmerged adapters a of  scale_a * B_a A_a dropout_a(x)

The wrapper re-registers the base layer's own parameters under their own names (`weight`,
`bias`), so `...q_proj.weight` keeps its key: a base checkpoint loads unchanged and only
adapter keys (`...q_proj.adapters.<name>.lora_A`) are added. The base module object is kept
out of the module tree, only to restore it on unload and to answer attribute look-ups
(`in_features`, `nf`, `padding_idx`, ...) that model code makes on the layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def base_kind(module: nn.Module) -> str | None:
    """Which kind of base layer this is, or None if it cannot be wrapped."""
    if isinstance(module, LoraLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def linear_forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def conv1d_forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    # transformers' Conv1D: weight is [in, out]
    out = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)
    return out.view(*x.shape[:-1], layer.weight.shape[1])


def embedding_forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    b = layer.base_module
    return F.embedding(x, layer.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)


# kind -> (forward of the frozen base, weight stored as [in, out] rather than [out, in])
BASE_KINDS = {
    "linear": (linear_forward, False),
    "conv1d": (conv1d_forward, True),
    "embedding": (embedding_forward, True),  # [vocab, dim]: "in" is the vocabulary
}


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrappable layer, whatever its weight layout."""
    rows, cols = module.weight.shape
    return (rows, cols) if BASE_KINDS[base_kind(module)][1] else (cols, rows)


class LoraLayer(nn.Module):
    """A frozen base layer plus a dict of named adapters, any subset of them active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base).__name__}: only Linear, Conv1D and Embedding")
        self.kind = kind
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        object.__setattr__(self, "base_module", base)  # set last: not a child, its parameters live here

    @property
    def fan_in_fan_out(self) -> bool:
        return BASE_KINDS[self.kind][1]

    @property
    def in_out(self) -> tuple[int, int]:
        return in_out(self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base_module")
            if base is None:
                raise
            return getattr(base, name)

    def add(self, name: str, adapter: nn.Module, active: bool = True) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        if active:
            self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = BASE_KINDS[self.kind][0](self, x)
        for name in self.active:
            if name not in self.merged:
                y = y + self.adapters[name](x).to(y.dtype)
        return y

    def delta_in_base_layout(self, name: str) -> torch.Tensor:
        delta = self.adapters[name].delta_weight()  # [out, in]
        return (delta.T if self.fan_in_fan_out else delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Add adapter `name` into the base weight; `safe` refuses a non-finite result."""
        if name in self.merged:
            return
        merged = self.weight + self.delta_in_base_layout(name)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        self.weight.copy_(merged)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters, last merged first."""
        while self.merged:
            name = self.merged.pop()
            self.weight.sub_(self.delta_in_base_layout(name))

    def unwrap(self) -> nn.Module:
        """The base module, holding this layer's (possibly merged) parameters."""
        base = self.base_module
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module
