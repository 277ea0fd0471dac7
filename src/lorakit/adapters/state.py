"""The record of a model's adapters: each one's spec, how they stack, and which are active.

The wrapped layers hold the adapters' weights; this record, one attribute of the model
(`model.lorakit_adapters`), holds what belongs to an adapter as a whole. Read and change it through
`adapters_of(model)`; `inject`, `load_adapter`, `set_active`, `set_parent` and `remove_adapter` keep it
and the layers in step.

Adapters may stack: an adapter on top of a parent adapter is only ever active with its whole chain
(root first), like a path in a tree of adapters. Saving records the parent in adapter_config.json
(see metadata.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.spec import LoraSpec

ATTRIBUTE = "lorakit_adapters"


@dataclass
class ModelAdapters:
    """The adapters on one model: `specs` {name: spec} in the order added, `parents` {child: parent}
    for stacked ones, and `active`, the names active on the layers (chains expanded, roots first)."""

    specs: dict[str, LoraSpec] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def chain(self, name: str) -> list[str]:
        """`name`'s chain of parents, root first, ending with `name` itself."""
        chain = [name]
        while chain[0] in self.parents:
            chain.insert(0, self.parents[chain[0]])
        return chain

    def children(self, name: str) -> list[str]:
        """Every adapter stacked on `name`, directly or not."""
        return [n for n in self.parents if name in self.chain(n)[:-1]]

    def forget(self, name: str) -> None:
        """Drop `name` from the record (its weights are the layers' business)."""
        self.specs.pop(name, None)
        self.parents.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def clear(self) -> None:
        """Forget every adapter (when the wrappers are gone: `merge_and_unload`)."""
        self.specs, self.parents, self.active = {}, {}, []


def adapters_of(model: nn.Module) -> ModelAdapters:
    """The record of `model`'s adapters; a model without one is given an empty one."""
    record = getattr(model, ATTRIBUTE, None)
    if record is None:
        record = ModelAdapters()
        setattr(model, ATTRIBUTE, record)
    return record
