"""4-bit dequantization through a byte table: one lookup per packed byte instead of two per nibble.

`quant.nf4.dequantize_4bit` splits each byte into its two 4-bit codes, looks each code up and
scales; here a [256, 2] table maps a whole byte to its two code values at once, and the scaling is
one in-place multiply by the per-block absmax. Same bits as `dequantize_4bit` (tested), about
twice as fast on the CPU: it runs twice per QLoRA step for every frozen 4-bit weight.
"""

from __future__ import annotations

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
