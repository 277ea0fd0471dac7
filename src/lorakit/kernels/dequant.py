"""Faster 4-bit dequantization, bit for bit `quant.nf4.dequantize_4bit` (tested); it runs twice per
QLoRA step for every frozen 4-bit weight.

`dequantize_4bit_bytes`: a [256, 2] table maps a packed byte to its two code values in one lookup
(instead of splitting nibbles and looking each up), then one in-place multiply by the block absmax:
about 2x faster on the CPU. `dequantize_4bit_compiled`: the same arithmetic compiled by
torch.compile into one loop per weight shape (about 6x faster than the plain path on the CPU, a few
seconds of compiling per shape); where compiling fails it falls back to the byte table.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.quant.nf4 import QuantState, absmax_of, dequantize_4bit


def byte_table(code: Tensor) -> Tensor:
    """[256, 2]: the code values of a packed byte's high and low nibble."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize_4bit_bytes(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """`dequantize_4bit(packed, state, dtype)`, by byte table (falls back to it for a ragged last block)."""
    n = state.numel
    if n % state.blocksize or state.blocksize % 2:
        return dequantize_4bit(packed, state, dtype)
    q = packed.reshape(-1).view(torch.uint8)  # [n / 2]
    if q.numel() != n // 2:
        raise ValueError(f"packed weight holds {q.numel()} bytes; shape {tuple(state.shape)} needs {n // 2}")
    values = F.embedding(q.int(), byte_table(state.code))  # [n / 2, 2] fp32
    out = values.view(-1, state.blocksize).mul_(absmax_of(state)[:, None])  # [blocks, blocksize]
    return out.view(state.shape).to(dtype or state.dtype)


def dequantize_codes(q: Tensor, code: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """[blocks, blocksize] fp32 values of packed bytes q [n / 2] (the body torch.compile fuses)."""
    high, low = code[(q >> 4).int()], code[(q & 0xF).int()]  # [n / 2] each
    return torch.stack([high, low], dim=1).view(-1, blocksize) * absmax[:, None]


@functools.cache
def compiled_codes():
    return torch.compile(dequantize_codes)


def dequantize_4bit_compiled(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """`dequantize_4bit(packed, state, dtype)` through torch.compile; the byte table where that fails."""
    n = state.numel
    if n % state.blocksize or state.blocksize % 2 or not COMPILE["ok"]:
        return dequantize_4bit_bytes(packed, state, dtype)
    q = packed.reshape(-1).view(torch.uint8)  # [n / 2]
    if q.numel() != n // 2:
        raise ValueError(f"packed weight holds {q.numel()} bytes; shape {tuple(state.shape)} needs {n // 2}")
    try:
        out = compiled_codes()(q, state.code, absmax_of(state), state.blocksize)
    except Exception as e:  # noqa: BLE001 (no C++ compiler, an unsupported device: many error types)
        COMPILE["ok"] = False
        warnings.warn(f"torch.compile of 4-bit dequantization failed ({type(e).__name__}); using the byte table",
                      stacklevel=2)
        return dequantize_4bit_bytes(packed, state, dtype)
    return out.view(state.shape).to(dtype or state.dtype)


COMPILE = {"ok": True}  # set to False after the first failure
