"""The wrapper around one frozen base layer that holds named adapters.

    y = base(x) + sum over active, unmerged adapters a of  scale_a * B_a A_a dropout_a(x)

(that is plain LoRA's contribution; an adapter kind computes its own from x and base(x), e.g. DoRA).

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

from lorakit import kernels
from lorakit.adapters.dora import DoraAdapter
from lorakit.adapters.lora import LoraAdapter
from lorakit.kernels.lora_linear import lora_linear
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
        self.routing = None  # per-row adapters while `lorakit.route` is on (then `active` is ignored)
        object.__setattr__(self, "base_module", base)  # not a child: its parameters are re-registered here
        self.share_base_parameters()

    def share_base_parameters(self) -> None:
        """Register the base's own parameter objects here, under their own names."""
        self._parameters["weight"] = self.base_module.weight
        self._parameters["bias"] = getattr(self.base_module, "bias", None)

    def sync_base_parameters(self) -> None:
        """Point the base at the parameters registered here, when something swapped those: FSDP2 replaces
        a module's registered parameters by sharded and gathered tensors, and only this layer is in the
        module tree."""
        base, own = self.base_module._parameters, self._parameters
        if base["weight"] is not own["weight"]:  # FSDP2 swaps a module's parameters all at once
            base["weight"] = own["weight"]
            if own["bias"] is not None:
                base["bias"] = own["bias"]

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

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base model stores this weight [in, out] (GPT-2's Conv1D, also once made 4-bit)."""
        return self.kind == "conv1d" or (self.kind == "linear4bit" and self.base_module.conv1d)

    def add(self, name: str, adapter: nn.Module, active: bool = True) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        if active:
            self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_base_parameters()
        base_out = self.base_module(x)
        if self.routing is not None:  # a mixed-adapter batch: each row its own adapter
            return self.routing.apply(self, x, base_out)
        names = [n for n in self.active if n not in self.merged]
        fast = kernels.enabled() and not torch.is_autocast_enabled(x.device.type)
        y = base_out
        for name in names:
            adapter = self.adapters[name]
            if fast and type(adapter) is LoraAdapter and not adapter.embedding:
                # one autograd node, rank-sized intermediates; adds in place when nothing else reads base_out
                y = lora_linear(adapter.dropout(x), y, adapter.lora_A, adapter.lora_B, adapter.scale,
                                inplace=len(names) == 1)
            elif (fast and len(names) == 1 and type(adapter) is DoraAdapter and not adapter.embedding
                  and (not adapter.training or isinstance(adapter.dropout, nn.Identity))):
                y = adapter.apply_alone(x, base_out, self)
            else:
                y = y + adapter.contribution(x, base_out, self).to(y.dtype)
        return y

    def weight_oi(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as [out, in] (a view of a stored [in, out] weight; a 4-bit one dequantized)."""
        if self.kind == "linear4bit":
            return dequantize_weight(self.base_module, dtype)
        weight = self.weight.T if self.kind in TRANSPOSED else self.weight
        return weight if dtype is None else weight.to(dtype)

    @torch.no_grad()
    def set_weight_oi(self, weight: torch.Tensor) -> None:
        """Overwrite the (full-precision) base weight in place from an [out, in] matrix."""
        if self.kind == "linear4bit":
            raise ValueError("cannot overwrite a 4-bit weight in place without re-quantizing it (lossy)")
        self.weight.copy_(weight.T if self.kind in TRANSPOSED else weight)

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        """W x from the base output W x + b."""
        bias = self._parameters.get("bias")
        return base_out if bias is None else base_out - bias.to(base_out.dtype)

    def check_merge_keeps_others(self, name: str, merged: list[str] | None = None) -> None:
        """Merging changes the base weight, and so the function of any other active, unmerged adapter
        that reads it (DoRA): refuse rather than merge inexactly."""
        merged = self.merged if merged is None else merged
        readers = [n for n in self.active if n != name and n not in merged and self.adapters[n].reads_base_weight]
        if readers:
            raise ValueError(f"merging adapter {name!r} would change active adapter {readers[0]!r}, whose output "
                             "depends on the base weight (DoRA); merge that one first, or deactivate it")

    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Fold adapter `name` into the base weight; `safe` refuses a non-finite result."""
        if name in self.merged:
            return
        if self.kind == "linear4bit":
            raise ValueError("merging in place into a 4-bit weight would re-quantize it (lossy); "
                             "use merge_and_unload, which writes a full-precision layer")
        self.check_merge_keeps_others(name)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        merged = self.adapters[name].merged_weight(self.weight_oi(dtype))  # [out, in]
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        self.set_weight_oi(merged)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters out again, last merged first."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        while self.merged:
            name = self.merged.pop()
            self.set_weight_oi(self.adapters[name].unmerged_weight(self.weight_oi(dtype)))

    @torch.no_grad()
    def unwrap(self, names: list[str], safe: bool = False) -> nn.Module:
        """The base module with adapters `names` merged in (those that read the base weight first). A
        4-bit base becomes the full-precision layer it stands for (nn.Linear, or GPT-2's Conv1D) holding the
        merged dequantize(W): nothing is re-quantized."""
        names = merge_order([n for n in names if n in self.adapters], self.adapters)
        self.active = [n for n in self.active if n in names]  # the others are dropped with the wrapper
        if self.kind != "linear4bit":
            for name in names:
                self.merge(name, safe=safe)
            return self.base_module
        base = self.base_module
        weight = dequantize_weight(base, torch.float32)  # [out, in]
        for i, name in enumerate(names):
            self.check_merge_keeps_others(name, merged=names[:i])
            weight = self.adapters[name].merged_weight(weight)
            if safe and not torch.isfinite(weight).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        return base.full_precision(weight)


def merge_order(names: list[str], adapters: nn.ModuleDict) -> list[str]:
    """Adapters whose output depends on the base weight (DoRA) merge before the others, so that
    merging the others cannot change them."""
    return sorted(names, key=lambda n: not adapters[n].reads_base_weight)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module
