"""Merge adapters into the base weights, undo it, or drop the wrappers for a plain model.

`merge_weights` is the same merge as a pure function on state dicts (PEFT-format adapter
tensors + config onto base tensors), so a merge can run offline without building a model.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.copies import module_copies, remove_copies
from lorakit.adapters.inject import active_adapters, adapted_modules
from lorakit.adapters.io import AdapterFile, attach
from lorakit.adapters.layer import LoraLayer, merge_order
from lorakit.adapters.state import adapters_of


def merge(model: nn.Module, names: list[str] | None = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights of every wrapped layer.

    With `safe`, a non-finite result is refused before any weight of that layer changes, and
    the error names the adapter and the layer.
    """
    names = active_adapters(model) if names is None else names
    for path, layer in adapted_modules(model):
        for name in merge_order([n for n in names if n in layer.adapters], layer.adapters):
            try:
                layer.merge(name, safe=safe)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapted_modules(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str] | None = None, safe: bool = False) -> nn.Module:
    """Merge, then replace every wrapper by its plain base module (a copy of an active adapter's
    module replaces the original). Returns the same, now adapter-free, model."""
    names = active_adapters(model) if names is None else names
    for path, copies in list(module_copies(model)):
        chosen = [n for n in names if n in copies.copies]
        original = model.get_submodule(path)
        if chosen:
            replace(model, path, copies.copies[chosen[0]])
        else:
            remove_copies(original)
    for path, layer in adapted_modules(model):
        try:
            replace(model, path, layer.unwrap(names, safe=safe))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    adapters_of(model).clear()  # no adapter is left
    return model


@torch.no_grad()
def merge_module(base: nn.Module, adapter: AdapterFile, path: str, safe: bool = True) -> nn.Module:
    """A standalone base layer (holding real weights) with the adapter file's factors for module `path`
    merged in: what `merge_and_unload` makes of that layer inside a whole model (a 4-bit base comes
    back as a full-precision nn.Linear). Lets a merge go layer by layer without building the model."""
    layer = LoraLayer(base)
    attach(layer, adapter, path, "merged")
    try:
        return layer.unwrap(["merged"], safe=safe)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def merge_weights(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scales: dict[str, float],
    fan_in_fan_out: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Pure merge: {module}.weight += scale * B @ A for each module in `scales`.

    `adapter` holds `{module}.lora_A` [r, in] and `{module}.lora_B` [out, r], and for a DoRA adapter
    `{module}.magnitude` [out], which makes the merged weight m * (W + scale B A) / ||W + scale B A||
    (norm per output row). Modules named in `fan_in_fan_out` store the weight as [in, out]
    (Conv1D, Embedding). Returns a new dict.
    """
    merged = dict(base)
    for module, scale in scales.items():
        key = f"{module}.weight"
        if key not in base:
            raise KeyError(f"base has no weight {key!r} for the adapter's module {module!r}")
        if f"{module}.lora_E" in adapter:
            raise ValueError(f"{module}: an AdaLoRA adapter (lora_E) cannot be merged by merge_weights; "
                             "load it onto the model and use merge_and_unload")
        transposed = module in fan_in_fan_out
        weight = base[key].double().T if transposed else base[key].double()  # [out, in]
        delta = (adapter[f"{module}.lora_B"].double() @ adapter[f"{module}.lora_A"].double()) * scale
        if delta.shape != weight.shape:
            raise ValueError(f"{module}: adapter delta {tuple(delta.shape)} != base weight {tuple(weight.shape)}"
                             f"{' (transposed)' if transposed else ''}")
        weight = weight + delta
        magnitude = adapter.get(f"{module}.magnitude")
        if magnitude is not None:
            weight = (magnitude.double() / torch.linalg.vector_norm(weight, dim=1))[:, None] * weight
        merged[key] = (weight.T if transposed else weight).to(base[key].dtype)
    return merged
