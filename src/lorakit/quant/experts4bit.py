"""Storage of fused mixture-of-experts weights in 4-bit, expert by expert (for `linear4bit.Experts4bit`).

Each expert's matrix W_e [out, in] is quantized on its own, exactly as the weight of a 4-bit linear layer
(`quantize_4bit`: bitsandbytes' bytes, absmax and nested absmax for that matrix), and the E results are
stacked: packed [E, bytes], and one QuantState whose shape is [E, out, in] and whose absmax [E, blocks],
offset [E] and nested_absmax [E, nested blocks] have a row per expert. `expert_of` cuts out one expert as a
plain (packed, QuantState) pair, which dequantizes alone.

Why per expert and not one flat quantization of the [E, out, in] tensor: the 4-bit codes and absmax would be
the same (blocks never straddle experts when out * in is a multiple of the blocksize), but double
quantization's offset and 256-absmax blocks would span experts, so one expert could not be dequantized
without the others' statistics, nor a checkpoint that stores experts one by one be quantized as it is read.

State-dict layout of a stacked weight `key` (what `expert_entries` writes): `key` (packed [E, bytes]),
`key.absmax`, `key.quant_map`, with double quantization `key.nested_absmax`, `key.nested_quant_map` and
`key.nested_offset` [E], and `key.quant_state.bitsandbytes__<type>`: bitsandbytes' JSON for one expert
(shape [out, in]) without nested_offset. Expert e's slices are bitsandbytes' entries for W_e (`expert_entry`).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import Tensor, nn

from lorakit.quant.nf4 import QuantState, from_state_dict_entries

EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed")  # what transformers' `use_experts_implementation` sets


def fused_weights(module: nn.Module) -> tuple[str, ...]:
    """The names of the fused expert weights [E, out, in] of a transformers experts module (`gate_up_proj` or
    `up_proj`, and `down_proj`, which its `use_experts_implementation` forward multiplies by), or () if it is
    not one: 4-bit already, a LoRA wrapper, a module with other 3-d weights or without the flags that forward
    reads (its 3-d weights then stay in full precision, with a warning)."""
    if "quant_states" in module.__dict__ or "base_module" in module.__dict__:
        return ()
    if not all(hasattr(module, flag) for flag in EXPERT_FLAGS):
        return ()
    fused = tuple(n for n, p in module._parameters.items() if p is not None and p.dim() == 3)
    wanted = {"gate_up_proj" if module.has_gate else "up_proj", "down_proj"}
    return fused if set(fused) == wanted else ()


def stack_experts(parts: list[tuple[Tensor, QuantState]], quant_storage: torch.dtype = torch.uint8
                  ) -> tuple[Tensor, QuantState]:  # fmt: skip
    """(packed [E, bytes] viewed as `quant_storage`, stacked QuantState) from each expert's `quantize_4bit`."""
    states = [s for _, s in parts]
    stacked = lambda field: None if getattr(states[0], field) is None else torch.stack(
        [getattr(s, field) for s in states])  # fmt: skip
    state = dataclasses.replace(states[0], shape=torch.Size([len(parts), *states[0].shape]), absmax=stacked("absmax"),
                                offset=stacked("offset"), nested_absmax=stacked("nested_absmax"))
    packed = torch.stack([p.reshape(-1).view(torch.uint8) for p, _ in parts])  # [E, bytes]
    itemsize = torch.empty(0, dtype=quant_storage).element_size()
    if packed.shape[1] % itemsize:
        raise ValueError(f"{packed.shape[1]} packed bytes per expert cannot be viewed as {quant_storage}")
    return packed.view(quant_storage), state


def expert_of(packed: Tensor, state: QuantState, e: int) -> tuple[Tensor, QuantState]:
    """Expert e's (packed bytes, QuantState of [out, in]) out of a stack: views, no copy."""
    row = lambda t: None if t is None else t[e]
    return packed[e], dataclasses.replace(state, shape=state.shape[1:], absmax=state.absmax[e],
                                          offset=row(state.offset), nested_absmax=row(state.nested_absmax))


def expert_entries(key: str, state: QuantState) -> dict[str, Tensor]:
    """The quant-state entries of the stacked weight `key`, packed bytes left out (see the module's docstring)."""
    entries = {f"{key}.absmax": state.absmax, f"{key}.quant_map": state.code}
    fields = {"quant_type": state.quant_type, "blocksize": state.blocksize,
              "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape[1:])}
    if state.nested:
        entries |= {f"{key}.nested_absmax": state.nested_absmax, f"{key}.nested_quant_map": state.nested_code.clone(),
                    f"{key}.nested_offset": state.offset}
        fields |= {"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32"}
    entries[f"{key}.quant_state.bitsandbytes__{state.quant_type}"] = json_tensor(fields)
    return entries


def expert_entry(key: str, e: int, state_dict: dict) -> dict[str, Tensor]:
    """Expert e's bitsandbytes entries (`{key}.{e}.weight`, `{key}.{e}.weight.absmax`, ..., as
    `nf4.from_state_dict_entries` reads them), cut from the stacked entries of `key`."""
    out, one = f"{key}.{e}.weight", {}
    for suffix in ("", ".absmax", ".nested_absmax", ".quant_map", ".nested_quant_map"):
        if key + suffix in state_dict:
            value = state_dict[key + suffix]
            one[out + suffix] = value[e] if suffix in ("", ".absmax", ".nested_absmax") else value
    for k in [k for k in state_dict if k.startswith(f"{key}.quant_state.")]:
        fields = json.loads(bytes(state_dict[k].tolist()).decode("utf-8"))
        if f"{key}.nested_offset" in state_dict:
            fields["nested_offset"] = float(state_dict[f"{key}.nested_offset"][e])
        one[out + k.removeprefix(key)] = json_tensor(fields)
    return one


def read_stacked(key: str, state_dict: dict, experts: int, shape: tuple[int, int]) -> list[tuple[Tensor, QuantState]]:
    """Each expert's (packed uint8, QuantState) from the stacked entries of `key`, checked as bitsandbytes'
    entries are (`from_state_dict_entries`) and against the expected count and [out, in] shape."""
    count = len(state_dict[key])
    parts = [from_state_dict_entries(f"{key}.{e}.", expert_entry(key, e, state_dict)) for e in range(count)]
    shapes = {tuple(s.shape) for _, s in parts}
    if count != experts or shapes != {tuple(shape)}:
        raise ValueError(f"{key}: {count} experts of {sorted(shapes)} do not fit {experts} of {tuple(shape)}")
    return [(p.reshape(-1).view(torch.uint8), s) for p, s in parts]


def json_tensor(fields: dict) -> Tensor:
    """JSON text as a uint8 tensor (bitsandbytes' `pack_dict_to_tensor`)."""
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)
