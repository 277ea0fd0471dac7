"""Mixed-adapter batches: each row of one batch goes through its own adapter (or none).

    y[rows_a] = base(x)[rows_a] + contribution_a(x[rows_a], base(x)[rows_a])    for each adapter a

Every wrapped layer runs the base once on the whole batch, then adds each row's own low-rank
product, computed in one of two ways:

    decoding (few tokens a row): the layer's plain LoRA adapters stacked along the rank,
        y = base + ((x A_cat^T) * mask) B_cat^T,   mask: 1 on the ranks of each row's own adapter
    prefill (many tokens a row), and other kinds (DoRA, embeddings, dropout while training):
        grouped, each adapter's contribution once on its gathered rows, scatter-added back
        (the segmented gather of Punica's SGMV and S-LoRA); DoRA reads the gathered base output.

Decoding's stacked product takes a few operations per layer whatever the number of adapters: it
reads every adapter's factors once and multiplies each row by all of them, which costs less than
one small product per adapter when a row has few tokens; with many tokens a row the extra products
cost more than the grouped path's few operations per adapter.

In no-grad mode the stacks are built once per `route` block and reused by every decoding step:
change no adapter weights inside one. The routing belongs to the rows of the batch, so it holds
across the decoding steps of `generate` (the KV cache keeps each row in place) and with
left-padded prompts. Every path is differentiable: one backward trains every adapter in the batch
on its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import kernels
from lorakit.adapters.copies import module_copies
from lorakit.adapters.inject import adapter_chain, adapter_names
from lorakit.adapters.layer import LoraLayer, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.adapters.params import param_layers
from lorakit.kernels.lora_linear import lora_linear

# with t tokens a row and k adapters, multiplying every row by all k adapters' factors costs t * k low-rank
# products a row against t for the grouped path, which pays instead ~5 operations per adapter: the former
# wins while t * (k - 1) stays below this (decoding, t = 1)
ALL_ADAPTERS_MAX = 16


def batchable(adapter: nn.Module) -> bool:
    """Plain LoRA on a linear layer, without dropout at work: it can join the stacked product."""
    return (type(adapter) is LoraAdapter and not adapter.embedding
            and (not adapter.training or isinstance(adapter.dropout, nn.Identity)))


@dataclass
class Stack:
    """One layer's plain LoRA adapters in a routing, their factors concatenated along the rank."""

    names: list[str]
    A: torch.Tensor  # [r_1 + ... + r_k, in]
    B: torch.Tensor  # [out, r_1 + ... + r_k], each adapter's scale folded in
    mask: torch.Tensor  # [rows, r_1 + ... + r_k]: 1 on the ranks of each row's own adapters, else 0

    @classmethod
    def build(cls, layer: LoraLayer, names: list[str], groups: list[tuple[str, torch.Tensor | None]],
              rows: int, device: torch.device) -> Stack:
        adapters = [layer.adapters[n] for n in names]
        A, B = stacked_factors(layer, adapters)
        ranks = [a.lora_A.shape[0] for a in adapters]
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        mask = torch.zeros(rows, sum(ranks), dtype=A.dtype)
        for name, index in groups:  # a row may take several adapters: a stacked adapter's chain
            if name in names:
                k = names.index(name)
                mask[slice(None) if index is None else index.cpu(), starts[k]:starts[k] + ranks[k]] = 1
        mask = mask.to(device)
        return cls(names, A, B, mask)

    def add_to(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out [rows, ..., out] + each row's own scale * B A x."""
        rows = base_out.shape[0]
        h = F.linear(x.reshape(rows, -1, x.shape[-1]).to(self.A.dtype), self.A)  # [rows, t, sum r]
        delta = F.linear(h * self.mask[:, None], self.B)  # [rows, t, out]
        return base_out + delta.view(base_out.shape).to(base_out.dtype)


# no-grad mode: each layer's last stacked factors, reused by later routings over the same adapters (a
# server opens one routing per decoding step)
_STACKED = kernels.FactorCache()


def stacked_factors(layer: LoraLayer, adapters: list[LoraAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat [sum r, in], B_cat [out, sum r] with each adapter's scale folded in): built differentiably
    while training, else cached per layer until one of the factors is replaced or changed in place."""
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([a.lora_A for a in adapters]), torch.cat([a.lora_B * a.scale for a in adapters], dim=1)

    if torch.is_grad_enabled():
        return build()
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    return _STACKED.get(layer, factors, tuple(a.scale for a in adapters), build)


@dataclass
class RowRouting:
    """Which rows of the batch each adapter takes; a LoraLayer calls `apply` while routed."""

    rows: int  # batch size the routing was made for
    groups: list[tuple[str, torch.Tensor | None]]  # (adapter, row indices [n]); None = every row
    chained: bool = False  # some row takes several adapters (a stacked adapter's chain)
    on_device: dict[torch.device, list[tuple[str, torch.Tensor | None]]] = field(default_factory=dict)
    stacks: dict[LoraLayer, Stack] = field(default_factory=dict)  # no-grad mode: built once per layer

    def groups_on(self, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """The groups with their index tensors on `device` (moved once, then reused by every layer)."""
        if device not in self.on_device:
            self.on_device[device] = [(n, None if i is None else i.to(device)) for n, i in self.groups]
        return self.on_device[device]

    def stack(self, layer: LoraLayer, names: list[str], device: torch.device) -> Stack:
        if torch.is_grad_enabled():  # training: stacked anew from the live parameters, differentiably
            return Stack.build(layer, names, self.groups, self.rows, device)
        if layer not in self.stacks:
            self.stacks[layer] = Stack.build(layer, names, self.groups, self.rows, device)
        return self.stacks[layer]

    def apply(self, layer: LoraLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out [rows, ..., out] plus each row's own adapter contribution, for input x [rows, ...], or
        x [rows * t, in] from a model that flattened [rows, t, in] (OPT, before its MLP)."""
        if x.shape[0] != self.rows:
            if x.dim() != 2:
                raise ValueError(f"the batch was routed for {self.rows} rows but a layer got {x.shape[0]} "
                                 "(beam search or num_return_sequences change the batch: route the expanded rows)")
            if x.shape[0] % self.rows:
                raise ValueError(f"the batch was routed for {self.rows} rows but a layer got {x.shape[0]} flattened "
                                 f"token rows, which are not {self.rows} rows of equal length: they cannot be "
                                 "mapped back to the batch rows")
            # flattening [rows, t, in] keeps each row's t tokens together: route them as [rows, t, in]
            y = self.apply(layer, x.reshape(self.rows, -1, x.shape[-1]),
                           base_out.reshape(self.rows, -1, base_out.shape[-1]))  # [rows, t, out]
            return y.reshape(base_out.shape)
        groups = [(n, i) for n, i in self.groups_on(x.device) if n in layer.adapters]  # adapters of this layer
        if not groups:
            return base_out
        if (not torch.is_grad_enabled() and not self.chained and kernels.use_triton(x)
                and all(batchable(layer.adapters[n]) for n, _ in groups)):  # fmt: skip
            # CUDA serving, plain LoRA only: segmented kernels (SGMV/BGMV), one adapter a row
            from lorakit.kernels.triton_lora import routed_lora  # late: imports triton (optional, heavy)

            factors = [(a.lora_A, a.lora_B, a.scale) for a in (layer.adapters[n] for n, _ in groups)]
            return routed_lora(layer, factors, [i for _, i in groups], x, base_out)
        plain = [n for n, _ in groups if batchable(layer.adapters[n])]
        if len(groups) == 1 and plain and groups[0][1] is None:  # one plain adapter for every row
            adapter = layer.adapters[plain[0]]
            return lora_linear(x, base_out, adapter.lora_A, adapter.lora_B, adapter.scale)
        tokens_per_row = x.numel() // (x.shape[0] * x.shape[-1])
        stacked = plain if plain and tokens_per_row * (len(plain) - 1) < ALL_ADAPTERS_MAX else []
        y = base_out if not stacked else self.stack(layer, stacked, x.device).add_to(x, base_out)
        for name, index in groups:  # the rest, group by group
            if name in stacked:
                continue
            adapter = layer.adapters[name]
            if index is None:  # every row (the routed adapter or one of its parents)
                y = y + adapter.contribution(x, base_out, layer).to(base_out.dtype)
                continue
            delta = adapter.contribution(x.index_select(0, index), base_out.index_select(0, index), layer)
            delta = delta.to(base_out.dtype)  # [n, ..., out]
            y = y.index_add(0, index, delta) if y is base_out else y.index_add_(0, index, delta)
        return y


def group_rows(adapter_per_row: Sequence[str | None],
               chain: Callable[[str], list[str]] = lambda name: [name]) -> list[tuple[str, torch.Tensor | None]]:
    """(adapter, row indices) per distinct adapter, in order of first appearance; base rows get none. A row
    takes every adapter of `chain(its adapter)`: a stacked adapter brings its parents, root first."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_per_row):
        for link in chain(name) if name is not None else []:
            rows.setdefault(link, []).append(i)
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
    for path, layer in param_layers(model):
        routed = sorted({c for n in names for c in adapter_chain(model, n)} & set(layer.adapters))
        if routed:
            raise ValueError(f"adapter {routed[0]!r} adapts weights held as parameters at {path} (mixture-of-"
                             "experts weights, a router), which a mixed-adapter batch cannot route per row yet "
                             "(PEFT refuses it too); merge it into the base to serve it")
    for path, copies in module_copies(model):
        replaced = sorted(names & set(copies.copies))
        if replaced:
            raise ValueError(f"adapter {replaced[0]!r} replaces the whole module {path!r} (modules_to_save), "
                             "which cannot be routed per row")


@contextmanager
def route(model: nn.Module, adapter_per_row: Sequence[str | None]) -> Iterator[RowRouting]:
    """Within the block, row i of every batch goes through adapter `adapter_per_row[i]` only, with its
    parents if it is stacked on any (None = the base model), whatever adapters are active; module
    copies and expert adapters (which cannot be routed) are switched off."""
    adapter_per_row = list(adapter_per_row)
    check_routable(model, {n for n in adapter_per_row if n is not None})
    chains = {n: adapter_chain(model, n) for n in set(adapter_per_row) - {None}}  # each routed adapter's stack
    routing = RowRouting(len(adapter_per_row), group_rows(adapter_per_row, chains.__getitem__),
                         chained=any(len(c) > 1 for c in chains.values()))
    layers = [layer for _, layer in lora_layers(model)]
    copies = [c for _, c in module_copies(model)] + [p for _, p in param_layers(model)]  # both off, per row
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
