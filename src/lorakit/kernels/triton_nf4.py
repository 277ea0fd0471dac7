"""4-bit (NF4/FP4) dequantization as one Triton kernel; reference: `lorakit.quant.nf4.dequantize_4bit`.

Element i of the flat weight is nibble (i % 2) of byte i // 2 (even element in the high nibble),
scaled by the absmax of block i // blocksize; with double quantization that absmax is itself
`nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset`. Everything is computed
in fp32 in the reference's order and cast once (bf16 rounded to nearest even by hand), so the bits
equal the reference's; the kernel is compiled without fused multiply-adds for that.

`dequant_values` is the same arithmetic as a Triton function, shared with the fused matmuls
(`triton_matmul4bit`), which call it on a tile of weight indices and never write W.
Importing this module imports triton: the library imports it only where `kernels.use_triton` says so.
The kernels read a weight's quantization as plain tensors and numbers (`Blockwise4bit`) and import
nothing of `lorakit.quant`, which calls them.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements per program


@triton.jit
def dequant_values(idx, mask, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                   blocksize, nested_blocksize, NESTED: tl.constexpr):  # fmt: skip
    """fp32 values of flat weight indices `idx` (any shape); masked-off lanes give 0."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = idx // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0
        )
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def cast_rtne(values, dtype: tl.constexpr):
    """fp32 `values` cast to `dtype`, rounding to nearest even like torch's `.to(dtype)`.

    bf16 is rounded by hand on the bits (finite values only): the GPU's cast already rounds so,
    but Triton's interpreter truncates, and the tests compare bits under the interpreter.
    """
    if dtype == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(dtype)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b (fp32 accumulator). Under the interpreter, whose `tl.dot` multiplies bf16 operands'
    raw bits, both are upcast first (bf16 and fp16 products are exact in fp32, so nothing changes)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def launch(**options) -> dict:
    """Compiler options (num_warps, enable_fp_fusion, ...) for a launch; the interpreter takes none."""
    return {} if interpreting() else options


@triton.jit
def _dequant_kernel(packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr, n,
                    blocksize, nested_blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    values = dequant_values(idx, mask, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                            blocksize, nested_blocksize, NESTED)  # fmt: skip
    tl.store(out_ptr + idx, cast_rtne(values, out_ptr.dtype.element_ty), mask=mask)


class Blockwise4bit(Protocol):
    """What the 4-bit kernels read of a packed weight's quantization (`lorakit.quant.nf4.QuantState` is one)."""

    shape: tuple[int, ...]  # of the weight
    dtype: torch.dtype  # the weight's own: the default output dtype
    blocksize: int
    code: Tensor  # [16] fp32 code values, indexed by the 4-bit code
    absmax: Tensor  # [blocks] fp32 scales, or when nested their uint8 codes in `nested_code`
    nested_code: Tensor | None  # [256] fp32
    nested_absmax: Tensor | None  # [ceil(blocks / nested_blocksize)] fp32
    nested_blocksize: int | None
    offset: Tensor | None  # 0-d fp32, added to every nested absmax

    @property
    def nested(self) -> bool: ...

    @property
    def numel(self) -> int: ...


def kernel_args(packed: Tensor, state: Blockwise4bit) -> tuple:
    """The quantization arguments every 4-bit kernel takes, in `dequant_values`' order, plus NESTED."""
    q = packed.reshape(-1).view(torch.uint8)  # [(n + 1) // 2]
    n = state.numel
    if q.numel() != (n + 1) // 2:
        raise ValueError(f"packed weight holds {q.numel()} bytes; shape {tuple(state.shape)} needs {(n + 1) // 2}")
    if state.nested:  # the offset is read on the device (a 0-d tensor): no host sync
        return (q, state.code, state.absmax, state.nested_code, state.nested_absmax, state.offset, state.blocksize,
                state.nested_blocksize, True)  # fmt: skip
    # not nested: the nested pointers are never read; any tensor will do
    return q, state.code, state.absmax, state.code, state.code, state.code, state.blocksize, 1, False


def dequantize_4bit_triton(packed: Tensor, state: Blockwise4bit, dtype: torch.dtype | None = None) -> Tensor:
    """`dequantize_4bit(packed, state, dtype)`: the weight of `state.shape` in `dtype`, one kernel launch."""
    args = kernel_args(packed, state)
    n = state.numel
    out = torch.empty(n, dtype=dtype or state.dtype, device=packed.device)
    exact = launch(enable_fp_fusion=False)  # no FMA in the nested absmax: the reference's bits
    _dequant_kernel[(triton.cdiv(n, BLOCK),)](*args[:6], out, n, *args[6:8], NESTED=args[8], BLOCK=BLOCK, **exact)
    return out.view(state.shape)
