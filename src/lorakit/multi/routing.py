"""Mixed-adapter batches: each row of one batch goes through its own adapter (or none).

    y[rows_a] = base(x)[rows_a] + contribution_a(x[rows_a], base(x)[rows_a])    for each adapter a

Rows are grouped by adapter once per `route`; every wrapped layer then runs the base once on the
whole batch and each adapter's contribution once on its gathered rows, and scatter-adds it back
(the segmented gather of Punica's SGMV and S-LoRA), so the cost is one base product plus one
low-rank product per adapter present, not one forward per row. Any adapter kind works (DoRA
reads the gathered base output), on any base (4-bit too).

The routing belongs to the rows of the batch, so it holds across the decoding steps of
`generate` (the KV cache keeps each row in place) and with left-padded prompts. Gathers and
scatter-adds are differentiable: one backward trains every adapter in the batch on its own rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit import kernels
from lorakit.adapters.copies import module_copies
from lorakit.adapters.inject import adapter_names
from lorakit.adapters.layer import LoraLayer, lora_layers


@dataclass
class RowRouting:
    """Which rows of the batch each adapter takes; a LoraLayer calls `apply` while routed."""

    rows: int  # batch size the routing was made for
    groups: list[tuple[str, torch.Tensor | None]]  # (adapter, row indices [n]); None = every row
    on_device: dict[torch.device, list[tuple[str, torch.Tensor | None]]] = field(default_factory=dict)

    def groups_on(self, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """The groups with their index tensors on `device` (moved once, then reused by every layer)."""
        if device not in self.on_device:
            self.on_device[device] = [(n, None if i is None else i.to(device)) for n, i in self.groups]
        return self.on_device[device]

    def apply(self, layer: LoraLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out [rows, ..., out] plus each row's own adapter contribution, for input x [rows, ...]."""
        if x.shape[0] != self.rows:
            raise ValueError(f"the batch was routed for {self.rows} rows but a layer got {x.shape[0]} "
                             "(beam search or num_return_sequences change the batch: route the expanded rows)")
        if not torch.is_grad_enabled() and kernels.use_triton(x):  # CUDA serving: segmented kernels (SGMV/BGMV)
            from lorakit.kernels.triton_lora import routed_lora

            y = routed_lora(self.groups_on(x.device), layer, x, base_out)  # None: not all plain LoRA here
            if y is not None:
                return y
        y = None  # base_out plus the groups so far: one new tensor, then added to in place
        for name, index in self.groups_on(x.device):
            if name not in layer.adapters:  # this adapter does not adapt this layer
                continue
            adapter = layer.adapters[name]
            if index is None:  # the only group: every row
                return base_out + adapter.contribution(x, base_out, layer).to(base_out.dtype)
            delta = adapter.contribution(x.index_select(0, index), base_out.index_select(0, index), layer)
            delta = delta.to(base_out.dtype)  # [n, ..., out]
            y = base_out.index_add(0, index, delta) if y is None else y.index_add_(0, index, delta)
        return base_out if y is None else y


def group_rows(adapter_per_row: Sequence[str | None]) -> list[tuple[str, torch.Tensor | None]]:
    """(adapter, row indices) per distinct adapter, in order of first appearance; base rows get none."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_per_row):
        if name is not None:
            rows.setdefault(name, []).append(i)
    n = len(adapter_per_row)
    return [(name, None if len(idx) == n else torch.tensor(idx, dtype=torch.long)) for name, idx in rows.items()]


def check_routable(model: nn.Module, names: set[str]) -> None:
    """Refuse what a per-row routing cannot honour: unknown names, merged adapters (they change every
    row), and adapters that replace whole modules (`modules_to_save`)."""
    known = adapter_names(model)
    for name in sorted(names):
        if name not in known:
            raise ValueError(f"unknown adapter {name!r}; the model has {known}")
    for path, layer in lora_layers(model):
        if layer.routing is not None:
            raise ValueError("the model is already routed; `route` contexts do not nest")
        if layer.merged:
            raise ValueError(f"{path}: adapters {layer.merged} are merged into the base weight, which every row "
                             "would then see; unmerge before routing")
    for path, copies in module_copies(model):
        replaced = sorted(names & set(copies.copies))
        if replaced:
            raise ValueError(f"adapter {replaced[0]!r} replaces the whole module {path!r} (modules_to_save), "
                             "which cannot be routed per row")


@contextmanager
def route(model: nn.Module, adapter_per_row: Sequence[str | None]) -> Iterator[RowRouting]:
    """Within the block, row i of every batch goes through adapter `adapter_per_row[i]` only
    (None = the base model), whatever adapters are active; module copies are switched off."""
    adapter_per_row = list(adapter_per_row)
    check_routable(model, {n for n in adapter_per_row if n is not None})
    routing = RowRouting(len(adapter_per_row), group_rows(adapter_per_row))
    layers = [layer for _, layer in lora_layers(model)]
    copies = [c for _, c in module_copies(model)]
    saved_active = [c.active for c in copies]
    for layer in layers:
        layer.routing = routing
    for c in copies:
        c.active = []
    try:
        yield routing
    finally:
        for layer in layers:
            layer.routing = None
        for c, active in zip(copies, saved_active, strict=True):
            c.active = active
