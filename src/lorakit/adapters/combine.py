"""Weighted combination of LoRA adapters into a new adapter: dW_new = sum_i w_i dW_i per layer.

"linear" and "cat" are exact for any weights (negative ones too), ranks and scalings: the factors
are stacked along the rank, each B scaled by w_i * s_i, and the new adapter has scale 1:

    sum_i w_i s_i B_i A_i = [w_1 s_1 B_1, ..., w_n s_n B_n] [A_1; ...; A_n]      rank sum_i r_i

(PEFT's "linear" instead mixes the factors themselves, which is not the weighted sum of the
deltas.) "svd" builds the exact sum and keeps its best rank-`rank` approximation.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from lorakit.adapters.inject import adapter_names
from lorakit.adapters.layer import LoraLayer, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.config import LoraSpec

METHODS = ("linear", "cat", "svd")


def combine(
    model: nn.Module, weights: dict[str, float], new_name: str, method: str = "linear", rank: int | None = None,
) -> str:
    """Add adapter `new_name` = the weighted sum of the adapters in `weights` ({name: weight}) on every
    layer that has any of them. It is added inactive and frozen; activate it with `set_active`.
    `rank` is for "svd" (default: the largest rank combined on each layer)."""
    check_combinable(model, weights, new_name, method, rank)
    ranks: dict[str, int] = {}
    for path, layer in lora_layers(model):
        present = {n: w for n, w in weights.items() if n in layer.adapters}
        if not present:
            continue
        a, b = svd_factors(layer, present, rank) if method == "svd" else stacked_factors(layer, present)
        first = layer.adapters[next(iter(present))]
        in_features, out_features = layer.in_out
        adapter = LoraAdapter(in_features, out_features, a.shape[0], a.shape[0], embedding=first.embedding,
                              device=first.lora_A.device, dtype=first.lora_A.dtype)  # alpha = r: scale 1
        with torch.no_grad():
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
        adapter.requires_grad_(False)
        layer.add(new_name, adapter, active=False)
        ranks[path] = a.shape[0]
    model.lorakit_specs = {**model.lorakit_specs, new_name: combined_spec(ranks)}
    return new_name


def check_combinable(model: nn.Module, weights: dict[str, float], new_name: str, method: str,
                     rank: int | None) -> None:
    known = adapter_names(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not weights:
        raise ValueError("weights is empty: name at least one adapter to combine")
    if not new_name or "." in new_name or new_name in known:
        raise ValueError(f"new adapter name {new_name!r} must be non-empty, contain no '.', and be unused")
    if rank is not None and (method != "svd" or rank <= 0):
        raise ValueError(f"rank={rank!r} is for method='svd' only, and must be positive")
    for name in weights:
        if name not in known:
            raise ValueError(f"unknown adapter {name!r}; the model has {known}")
        spec = model.lorakit_specs[name]
        if spec.kind != "lora":
            raise ValueError(f"adapter {name!r} is a {spec.kind} adapter; only plain LoRA deltas add up linearly")
        if spec.modules_to_save:
            raise ValueError(f"adapter {name!r} has modules_to_save, whose full copies cannot be combined")


def stacked_factors(layer: LoraLayer, weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; ...; A_n] ([sum r_i, in]), B = [w_1 s_1 B_1, ..., w_n s_n B_n] ([out, sum r_i])."""
    adapters = [layer.adapters[n] for n in weights]
    a = torch.cat([ad.lora_A.detach() for ad in adapters], dim=0)
    b = torch.cat([ad.lora_B.detach() * (w * ad.scale) for ad, w in zip(adapters, weights.values(), strict=True)],
                  dim=1)
    return a, b


def svd_factors(layer: LoraLayer, weights: dict[str, float], rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (Frobenius norm) of the exact sum, split as sqrt(S) on each side."""
    adapters = [layer.adapters[n] for n in weights]
    delta = sum(w * ad.delta_weight().detach().double() for ad, w in zip(adapters, weights.values(), strict=True))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # delta: [out, in]
    k = min(rank or max(ad.r for ad in adapters), s.shape[0])
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root  # A: [k, in], B: [out, k]


def combined_spec(ranks: dict[str, int]) -> LoraSpec:
    """A spec for the new adapter: scale 1 everywhere (alpha = r), other ranks as exact-name patterns."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(path): r for path, r in ranks.items() if r != common}
    return LoraSpec(r=common, alpha=common, targets=sorted(ranks), rank_pattern=other, alpha_pattern=dict(other))
