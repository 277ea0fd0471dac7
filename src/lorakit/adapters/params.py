"""LoRA on weight matrices held as plain parameters: fused mixture-of-experts weights and routers.

In transformers 5, Mixtral's and Qwen3-MoE's experts are one module holding `gate_up_proj`
[E, 2 * ff, hidden] and `down_proj` [E, hidden, ff] (expert e computes x W_e^T), and the router holds
`weight` [E, hidden] (a 2-d parameter is one "expert"). An adapter gives every expert its own factors:

    W_e' = W_e + scale * B_e A_e,   A: [E, r, in], B: [E, out, r],   scale = alpha / r

and the module runs its own forward with W' in place of W (`torch.func.functional_call`), so any
experts implementation (loop, grouped_mm) sees adapted weights. This is PEFT's `target_parameters`
(`ParamWrapper`), whose file stores A as [E * r, in] (expert-major rows) and B as [out, r * E]
(rank-major columns, `B.reshape(out, r, E)[..., e]` is B_e); `peft_factors` / `from_peft` convert.
PEFT refuses dropout, DoRA and mixed-adapter batches on these, and so does lorakit.

Over 4-bit experts (`quant.linear4bit.Experts4bit`, QLoRA) the dense W' is never formed: the experts module
runs its own loop, each routed-to expert's W_e dequantized on its own, and adds scale * x A_e^T B_e^T; the
gradient reaches the factors only. A merge there gives the full-precision experts module holding
dequantize(W_e) + scale * B_e A_e.

The wrapper keeps the base's parameter names (`...experts.gate_up_proj`), as `LoraLayer` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from lorakit.adapters.layer import BaseWrapper
from lorakit.adapters.lora import lora_scale
from lorakit.quant.linear4bit import Experts4bit


def held_shape(weight: torch.Tensor) -> torch.Size:
    """The shape of a held weight as the model stores it: the packed bytes of 4-bit experts say theirs."""
    return getattr(weight, "lorakit_shape", weight.shape)


def stacked_shape(weight: torch.Tensor) -> tuple[int, int, int]:
    """(experts, out, in) of a [E, out, in] or [out, in] parameter (4-bit experts: of the weight they hold)."""
    shape = held_shape(weight)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return tuple(shape)
    raise ValueError(f"a {len(shape)}-d parameter cannot take LoRA (only [out, in] and [experts, out, in])")


class ParamAdapter(nn.Module):
    """One adapter's factors for one stacked weight [E, out, in]: per expert e, scale * B_e A_e."""

    def __init__(self, shape: tuple[int, int, int], r: int, alpha: float, *, rslora: bool = False,
                 init: str = "kaiming", device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        experts, out_features, in_features = shape
        self.r, self.alpha, self.scale = r, alpha, lora_scale(r, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, r, device=device, dtype=dtype))
        with torch.no_grad():  # PEFT's init of its [E * r, in] lora_A (fan-in = in, as per expert)
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.view(-1, in_features), a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """scale * B_e A_e for every expert: [E, out, in]."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scale

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E * r, in], B [out, r * E]) as PEFT's ParamWrapper stores them."""
        experts, out_features, r = self.lora_B.shape
        return self.lora_A.reshape(experts * r, -1), self.lora_B.permute(1, 2, 0).reshape(out_features, r * experts)

    @torch.no_grad()
    def from_peft(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set the factors from PEFT's A [E * r, in] and B [out, r * E]."""
        experts, out_features, r = self.lora_B.shape
        self.lora_A.copy_(a.reshape(experts, r, -1))
        self.lora_B.copy_(b.reshape(out_features, r, experts).permute(2, 0, 1))


class ParamAdapters(nn.ModuleDict):
    """One named adapter on a module: a ParamAdapter per adapted parameter."""

    reads_base_weight = False  # (for `merge_order`) its update does not depend on the base weight


class ParamLoraLayer(BaseWrapper):
    """A module holding weight matrices as parameters (MoE experts, a router), plus named adapters on some of
    them: `adapters[name][parameter]` is a ParamAdapter. Any subset of adapters can be active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if getattr(base, "is_transposed", False):
            raise ValueError(f"{type(base).__name__} stores its experts as [E, in, out] (is_transposed), which "
                             "lorakit's expert adapters do not support yet")
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.routing = None  # never set: `lorakit.route` refuses models with expert adapters
        object.__setattr__(self, "base_module", base)  # not a child: its parameters are re-registered here
        self._modules.update(base._modules)  # its sub-modules (activation) keep their names too
        self.share_base_parameters()

    def share_base_parameters(self) -> None:
        self._parameters.update(self.base_module._parameters)

    def add(self, name: str, adapters: dict[str, ParamAdapter], active: bool = True) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this module")
        self.adapters[name] = ParamAdapters(adapters)
        if active:
            self.active.append(name)

    def forward(self, *args, **kwargs):
        self.base_module._parameters.update(self._parameters)  # FSDP2 swaps the registered ones (see LoraLayer)
        names = [n for n in self.active if n not in self.merged]
        if not names:
            return self.base_module(*args, **kwargs)
        if isinstance(self.base_module, Experts4bit):  # per expert: x W_e^T + scale * x A_e^T B_e^T
            lora = {}
            for name in names:
                for param, adapter in self.adapters[name].items():
                    lora.setdefault(param, []).append((adapter.lora_A, adapter.lora_B, adapter.scale))
            return self.base_module(*args, lora=lora, **kwargs)
        weights = {}
        for name in names:
            for param, adapter in self.adapters[name].items():
                weight = weights.get(param, self._parameters[param])
                weights[param] = weight + adapter.delta_weight().reshape(weight.shape).to(weight.dtype)
        return functional_call(self.base_module, weights, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Fold adapter `name` into the base parameters; `safe` refuses a non-finite result."""
        if name in self.merged:
            return
        if isinstance(self.base_module, Experts4bit):
            raise ValueError("merging in place into 4-bit experts would re-quantize them (lossy); use "
                             "merge_and_unload, which writes the full-precision experts module")
        merged = {}
        for param, adapter in self.adapters[name].items():
            weight = self._parameters[param]
            merged[param] = weight.float() + adapter.delta_weight().reshape(weight.shape).float()
            if safe and not torch.isfinite(merged[param]).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights in {param}")
        for param, weight in merged.items():
            self._parameters[param].copy_(weight)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            for param, adapter in self.adapters[self.merged.pop()].items():
                weight = self._parameters[param]
                weight.copy_(weight.float() - adapter.delta_weight().reshape(weight.shape).float())

    @torch.no_grad()
    def unwrap(self, names: list[str], safe: bool = False) -> nn.Module:
        """The base module with adapters `names` merged in; 4-bit experts become the full-precision experts
        module holding the merged dequantize(W) (nothing is re-quantized)."""
        if isinstance(self.base_module, Experts4bit):
            weights = {p: self.base_module.dequantized(p, torch.float32) for p in self.base_module.quantized}
            for name in [n for n in names if n in self.adapters]:
                for param, adapter in self.adapters[name].items():
                    weights[param] = weights[param] + adapter.delta_weight().reshape(weights[param].shape).float()
                    if safe and not torch.isfinite(weights[param]).all():
                        raise ValueError(f"merging adapter {name!r} gives non-finite weights in {param}")
            return self.base_module.full_precision(weights)
        for name in names:
            if name in self.adapters:
                self.merge(name, safe=safe)
        return self.base_module


def param_layers(model: nn.Module) -> Iterator[tuple[str, ParamLoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, ParamLoraLayer):
            yield path, module


def peft_key_prefixes(layer: ParamLoraLayer, params: list[str]) -> dict[str, str]:
    """PEFT nests one ParamWrapper per adapted parameter, in the module's registration order, the last
    outermost: parameter -> its key infix (`""`, `".base_layer"`, `".base_layer.base_layer"`, ...)."""
    ordered = [p for p in layer.base_module._parameters if p in params]
    return {p: ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}
