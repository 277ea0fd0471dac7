"""PEFT's on-disk format for adapters of held weights (fused mixture-of-experts parameters, routers; see
params.py): its `target_parameters` and nested ParamWrapper keys, both ways. io.py calls these; an error here
is a ValueError that io.py turns into an AdapterFileError naming the file."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.inject import held_weights, name_matches, pattern_value, wrap
from lorakit.adapters.layer import base_kind
from lorakit.adapters.params import (
    ParamAdapter,
    ParamLoraLayer,
    held_shape,
    param_layers,
    peft_key_prefixes,
    stacked_shape,
)
from lorakit.adapters.spec import LoraSpec


def param_tensors(model: nn.Module, name: str, tensors: dict, base_shapes: dict, prefix: str) -> list[str]:
    """Add adapter `name`'s held-weight (expert) factors to `tensors` under PEFT's nested ParamWrapper keys
    (`<module>[.base_layer...].lora_A.weight`) and their weights' shapes to `base_shapes`; their full names."""
    names = []
    for path, layer in param_layers(model):
        if name not in layer.adapters:
            continue
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged into {path}; unmerge before saving")
        adapters = layer.adapters[name]
        for param, infix in peft_key_prefixes(layer, list(adapters)).items():
            tensors[f"{prefix}{path}{infix}.lora_A.weight"], tensors[f"{prefix}{path}{infix}.lora_B.weight"] = (
                adapters[param].peft_factors())
            base_shapes[f"{path}.{param}"] = list(held_shape(layer.base_module._parameters[param]))
            names.append(f"{path}.{param}")
    return sorted(names)

def exact_parameters(model: nn.Module, params: list[str]) -> list[str]:
    """Short names (`gate_up_proj`, `gate.weight`) if they select exactly `params` under PEFT's rule, else the
    full names."""
    short = sorted({".".join(p.split(".")[-2:]) if p.endswith(".weight") else p.rsplit(".", 1)[-1] for p in params})
    return short if {n for n in held_weights(model) if name_matches(n, short)} == set(params) else params

def held_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices a module holds as its own parameters (through an expert wrapper too)."""
    base = module.base_module if isinstance(module, ParamLoraLayer) else module
    return {n: p for n, p in base._parameters.items() if p is not None and p.dim() >= 2}

def split_params(model: nn.Module, spec: LoraSpec, lora: dict) -> tuple[dict, dict]:
    """(LoRA pairs of layers, LoRA pairs of held weights by full parameter name) of an adapter file. PEFT keys
    a held weight by its module, one `.base_layer` deeper for each parameter adapted after it on that module
    (`peft_key_prefixes`); which parameters those are, `target_parameters` says. `lora`: module -> pair."""
    if not spec.target_parameters:
        return lora, {}
    layers, params, depths = {}, {}, {}
    for key, pair in lora.items():
        path, depth = key, 0
        while path.endswith(".base_layer"):
            path, depth = path.removesuffix(".base_layer"), depth + 1
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or base_kind(module) is not None:
            layers[key] = pair
        else:
            depths.setdefault(path, {})[depth] = pair
    for path, pairs in depths.items():
        named = [p for p in held_params(model.get_submodule(path))
                 if name_matches(f"{path}.{p}", spec.target_parameters)]
        if sorted(pairs) != list(range(len(named))):
            raise ValueError(f"module {path!r} has LoRA tensors for {len(pairs)} parameters, but "
                                   f"target_parameters name {len(named)} of it ({named})")
        for depth, pair in pairs.items():
            params[f"{path}.{named[len(named) - 1 - depth]}"] = pair
    return layers, params

def check_param_pairs(model: nn.Module, spec: LoraSpec, params: dict) -> None:
    """Refuse held-weight factors whose shapes or rank do not fit: A [E * r, in], B [out, r * E]."""
    for full, pair in params.items():
        path, _, param = full.rpartition(".")
        experts, n_out, n_in = stacked_shape(held_params(model.get_submodule(path))[param])
        a, b = pair["lora_A"].shape, pair["lora_B"].shape
        r = pattern_value(full, spec.rank_pattern, spec.r)
        if a != (experts * r, n_in) or b != (n_out, r * experts):
            raise ValueError(f"parameter {full!r} is [experts={experts}, out={n_out}, in={n_in}] "
                                   f"but lora_A is {list(a)} and lora_B is {list(b)} (expected [{experts * r}, "
                                   f"{n_in}] and [{n_out}, {r * experts}] at rank {r})")

def load_params(model: nn.Module, spec: LoraSpec, params: dict, name: str, trainable: bool) -> None:
    """Add adapter `name` on the held weights `params` (full name -> PEFT's factors), one wrapper per module."""
    by_module = {}
    for full, pair in params.items():
        path, _, param = full.rpartition(".")
        weight = held_params(model.get_submodule(path))[param]
        shape = stacked_shape(weight)
        r = pair["lora_A"].shape[0] // shape[0]
        alpha = pattern_value(full, spec.alpha_pattern, spec.alpha)
        lora = ParamAdapter(shape, r, alpha, rslora=spec.rslora, device=weight.device, dtype=pair["lora_A"].dtype)
        lora.from_peft(pair["lora_A"], pair["lora_B"])
        by_module.setdefault(path, {})[param] = lora.requires_grad_(trainable)
    for path, adapters in by_module.items():
        wrap(model, path, ParamLoraLayer).add(name, adapters)
