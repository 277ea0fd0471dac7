"""The wrapper around one frozen base layer that holds named adapters.

    y = base(x) + sum over active, unmerged adapters a of  scale_a * B_a A_a dropout_a(x)

The wrapper re-registers the base layer's own parameter objects under their own names
(`weight`, `bias`), so `...q_proj.weight` keeps its key: a base checkpoint loads unchanged and
only adapter keys (`...q_proj.adapters.<name>.lora_A`) are added. The base module itself is kept
out of the module tree; it computes the base output, moves/saves/loads its parameters its own
way (a 4-bit weight keeps its quantization state), comes back on unload, and answers attribute
look-ups (`in_features`, `nf`, `padding_idx`, ...) that model code makes on the layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.quant.linear4bit import Linear4bit, dequantize_weight


def base_kind(module: nn.Module) -> str | None:
    """Which kind of base layer this is, or None if it cannot be wrapped."""
    if isinstance(module, LoraLayer):
        return module.kind
    if isinstance(module, Linear4bit):
        return "linear4bit"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


# kinds whose weight is stored [in, out] rather than [out, in] (an embedding's "in" is the vocabulary)
TRANSPOSED = {"conv1d", "embedding"}


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrappable layer, whatever its weight layout or storage."""
    kind = base_kind(module)
    if kind == "linear4bit":
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (rows, cols) if kind in TRANSPOSED else (cols, rows)


class LoraLayer(nn.Module):
    """A frozen base layer plus a dict of named adapters, any subset of them active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base).__name__}: only Linear, Linear4bit, Conv1D and Embedding")
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        object.__setattr__(self, "base_module", base)  # not a child: its parameters are re-registered here
        self.share_base_parameters()

    def share_base_parameters(self) -> None:
        """Register the base's own parameter objects here, under their own names."""
        self._parameters["weight"] = self.base_module.weight
        self._parameters["bias"] = getattr(self.base_module, "bias", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base_module")
            if base is None:
                raise
            return getattr(base, name)

    # The base module decides how its parameters move, save and load (a 4-bit weight is never cast,
    # and writes its quantization state beside itself); this layer then shares the results.
    def _apply(self, fn, recurse: bool = True):
        self.base_module._apply(fn)
        self.share_base_parameters()
        self.adapters._apply(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.base_module._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        self.base_module._load_from_state_dict(state_dict, prefix, *args)
        self.share_base_parameters()

    @property
    def in_out(self) -> tuple[int, int]:
        return in_out(self.base_module)

    def add(self, name: str, adapter: nn.Module, active: bool = True) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        if active:
            self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_module(x)
        for name in self.active:
            if name not in self.merged:
                y = y + self.adapters[name](x).to(y.dtype)
        return y

    def delta_in_base_layout(self, name: str) -> torch.Tensor:
        delta = self.adapters[name].delta_weight()  # [out, in]
        return delta.T if self.kind in TRANSPOSED else delta

    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Add adapter `name` into the base weight; `safe` refuses a non-finite result."""
        if name in self.merged:
            return
        if self.kind == "linear4bit":
            raise ValueError("merging in place into a 4-bit weight would re-quantize it (lossy); "
                             "use merge_and_unload, which writes a full-precision layer")
        merged = self.weight + self.delta_in_base_layout(name).to(self.weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        self.weight.copy_(merged)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters, last merged first."""
        while self.merged:
            name = self.merged.pop()
            self.weight.sub_(self.delta_in_base_layout(name).to(self.weight.dtype))

    @torch.no_grad()
    def unwrap(self, names: list[str], safe: bool = False) -> nn.Module:
        """The base module with adapters `names` merged in. A 4-bit base becomes a full-precision
        nn.Linear holding dequantize(W) + deltas: nothing is re-quantized."""
        if self.kind != "linear4bit":
            for name in names:
                if name in self.adapters:
                    self.merge(name, safe=safe)
            return self.base_module
        base = self.base_module
        weight = dequantize_weight(base, torch.float32)  # [out, in]
        for name in names:
            if name in self.adapters:
                weight += self.adapters[name].delta_weight().float()
                if safe and not torch.isfinite(weight).all():
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        dtype = base.compute_dtype
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module
