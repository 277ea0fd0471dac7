"""Trainable full copies of whole modules (PEFT's `modules_to_save`), e.g. a new head.

The original module stays where it is, under its own name; its copies hang below it as
`<module>.lora_copies.<adapter>` and its `forward` is routed to the copy of the active adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from torch import nn


class ModuleCopies(nn.Module):
    """The per-adapter copies of one module and which one (if any) replaces it."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "original_forward", original.forward)
        self.copies = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str, original: nn.Module, trainable: bool = True, active: bool = True) -> None:
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        own = original._modules.pop("lora_copies")  # copy the module without its copies
        routed = original.__dict__.pop("forward")
        try:
            clone = copy.deepcopy(original)
        finally:
            original._modules["lora_copies"] = own
            original.__dict__["forward"] = routed
        clone.requires_grad_(trainable)
        self.copies[name] = clone
        if active:
            self.active.append(name)

    def forward(self, *args, **kwargs):
        if not self.active:
            return self.original_forward(*args, **kwargs)
        if len(self.active) > 1:
            raise RuntimeError(f"adapters {self.active} each replace this module; activate only one of them")
        return self.copies[self.active[0]](*args, **kwargs)


def add_copy(module: nn.Module, name: str, trainable: bool = True, active: bool = True) -> ModuleCopies:
    """Give `module` a copy for adapter `name`; later calls of `module` go to the active copy."""
    copies = getattr(module, "lora_copies", None)
    if not isinstance(copies, ModuleCopies):
        copies = ModuleCopies(module)
        module.add_module("lora_copies", copies)
        module.forward = copies.forward
    copies.add(name, module, trainable, active)
    return copies


def remove_copies(module: nn.Module) -> None:
    if isinstance(getattr(module, "lora_copies", None), ModuleCopies):
        del module.lora_copies
        module.__dict__.pop("forward", None)


def module_copies(model: nn.Module) -> Iterator[tuple[str, ModuleCopies]]:
    """(path of the original module, its copies) for every module that has copies."""
    for path, module in model.named_modules():
        if isinstance(module, ModuleCopies):
            yield path.rsplit(".", 1)[0] if "." in path else "", module
