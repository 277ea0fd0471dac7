"""Weighted combination of LoRA adapters into a new adapter: dW_new = sum_i w_i dW_i per layer.

"linear" and "cat" are exact for any weights (negative ones too), ranks and scalings: the factors
are stacked along the rank, each B scaled by w_i * s_i, and the new adapter has scale 1:

    sum_i w_i s_i B_i A_i = [w_1 s_1 B_1, ..., w_n s_n B_n] [A_1; ...; A_n]      rank sum_i r_i

(PEFT's "linear" instead mixes the factors themselves, which is not the weighted sum of the
deltas.) "svd" builds the exact sum and keeps its best rank-`rank` approximation.

"ties", "dare_linear" and "dare_ties" follow the formulas of PEFT's `merge_utils` (TIES: keep the
top-`density` fraction of each task tensor by magnitude, elect the sign of the column-wise sum,
average the weighted survivors that agree with it; DARE: keep each entry with probability
`density` and rescale it by 1/density (drop rate p = 1 - density), seeded, then sum ("linear") or
elect signs and average ("ties")). They run on each layer's full delta weights dW_i = s_i B_i A_i
and the result is factored back to `rank` by SVD. PEFT runs them on the factors A and B
separately, but a LoRA delta fixes its factors only up to an invertible r x r matrix
(B A = (B M)(M^-1 A)): trimming, dropping and sign votes on the factors change with that
arbitrary choice, the magnitudes of A and B do not measure the delta's, and the product of two
trimmed factors is not the trimmed delta. On the deltas the methods mean what their papers
(and mergekit, which works on full weights) define, adapters of different ranks and scalings
mix, and rank truncation is the only approximation (exact when `rank` >= the layer's full rank).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from lorakit.adapters.inject import adapter_names
from lorakit.adapters.layer import LoraLayer, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.adapters.params import param_layers
from lorakit.adapters.spec import LoraSpec
from lorakit.adapters.state import adapters_of

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SPARSE = ("ties", "dare_linear", "dare_ties")  # need `density`; factored back by SVD


def combine(
    model: nn.Module, weights: dict[str, float], new_name: str, method: str = "linear", rank: int | None = None,
    density: float | None = None, seed: int = 0,
) -> str:
    """Add adapter `new_name` = the weighted combination of the adapters in `weights` ({name: weight}) on
    every layer that has any of them. It is added inactive and frozen; activate it with `set_active`.
    `rank` is for "svd" and the TIES/DARE methods (default: the largest rank combined on each layer);
    `density` (in (0, 1]) is the fraction TIES/DARE keep; `seed` makes DARE's drops reproducible."""
    check_combinable(model, weights, new_name, method, rank, density)
    generator = torch.Generator().manual_seed(seed)
    ranks: dict[str, int] = {}
    for path, layer in lora_layers(model):
        present = {n: w for n, w in weights.items() if n in layer.adapters}
        if not present:
            continue
        if method == "svd":
            a, b = svd_factors(layer, present, rank)
        elif method in SPARSE:
            a, b = sparse_factors(layer, present, method, density, rank, generator)
        else:
            a, b = stacked_factors(layer, present)
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
    adapters_of(model).specs[new_name] = combined_spec(ranks)
    return new_name


def check_combinable(model: nn.Module, weights: dict[str, float], new_name: str, method: str,
                     rank: int | None, density: float | None = None) -> None:
    known = adapter_names(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not weights:
        raise ValueError("weights is empty: name at least one adapter to combine")
    if not new_name or "." in new_name or new_name in known:
        raise ValueError(f"new adapter name {new_name!r} must be non-empty, contain no '.', and be unused")
    experts = [path for path, layer in param_layers(model) if set(weights) & set(layer.adapters)]
    if experts:
        raise ValueError(f"adapters {sorted(weights)} adapt weights held as parameters at {experts[0]} (mixture-of-"
                         "experts weights, a router), which combine does not support yet")
    if rank is not None and (method not in ("svd", *SPARSE) or rank <= 0):
        raise ValueError(f"rank={rank!r} is for method='svd' or {SPARSE} only, and must be positive")
    if (method in SPARSE) != (density is not None):
        raise ValueError(f"density is required by (and only by) methods {SPARSE}; got method={method!r}, "
                         f"density={density!r}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    for name in weights:
        if name not in known:
            raise ValueError(f"unknown adapter {name!r}; the model has {known}")
        spec = adapters_of(model).specs[name]
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
    """The best rank-`rank` factors (Frobenius norm) of the exact sum."""
    adapters = [layer.adapters[n] for n in weights]
    delta = sum(w * ad.delta_weight().detach().double() for ad, w in zip(adapters, weights.values(), strict=True))
    return truncated_factors(delta, rank or max(ad.r for ad in adapters), adapters[0].lora_A.dtype)


def sparse_factors(layer: LoraLayer, weights: dict[str, float], method: str, density: float, rank: int | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES / DARE on the layer's deltas, then the best rank-`rank` factors of the result."""
    adapters = [layer.adapters[n] for n in weights]
    deltas = torch.stack([ad.delta_weight().detach().double() for ad in adapters])  # [n, out, in]
    w = torch.tensor(list(weights.values()), dtype=torch.float64)
    if method == "ties":
        merged = ties_merge(deltas, w, density)
    else:
        merged = dare_merge(deltas, w, density, generator, ties=method == "dare_ties")
    return truncated_factors(merged, rank or max(ad.r for ad in adapters), adapters[0].lora_A.dtype)


def truncated_factors(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [out, in] ~ B A with A [k, in], B [out, k], k = min(rank, full rank); sqrt(S) on each side."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).to(dtype), (u[:, :k] * root).to(dtype)


def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of `t` largest in magnitude, zero the rest."""
    if density >= 1:
        return t
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return t * keep.view_as(t)


def elect_and_average(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election ("total": the sign of the sum of the unweighted tasks, ties to +) and disjoint
    merge: the mean, over tasks agreeing with the elected sign, of w_i * task_i. tasks: [n, ...]."""
    elected = torch.where(tasks.sum(0) >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = tasks.sign() == elected  # zeros (trimmed/dropped) never agree
    weighted = tasks * weights.view(-1, *[1] * (tasks.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties_merge(tasks: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each task to `density` by magnitude, elect signs, disjoint merge."""
    return elect_and_average(torch.stack([magnitude_trim(t, density) for t in tasks]), weights)


def dare_merge(tasks: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator,
               ties: bool = False) -> torch.Tensor:
    """DARE (Yu et al. 2023): keep each entry with probability `density`, rescaled by 1/density; then the
    weighted sum, or with `ties` TIES' sign election and disjoint merge."""
    if density < 1:
        tasks = torch.stack([t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density
                             for t in tasks])
    if ties:
        return elect_and_average(tasks, weights)
    return (tasks * weights.view(-1, *[1] * (tasks.dim() - 1))).sum(0)


def combined_spec(ranks: dict[str, int]) -> LoraSpec:
    """A spec for the new adapter: scale 1 everywhere (alpha = r), other ranks as exact-name patterns."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(path): r for path, r in ranks.items() if r != common}
    return LoraSpec(r=common, alpha=common, targets=sorted(ranks), rank_pattern=other, alpha_pattern=dict(other))
