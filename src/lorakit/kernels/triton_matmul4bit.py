"""y = x W^T + b with a 4-bit W dequantized inside the matmul (Triton), never written to memory.

Reference: `F.linear(x, dequantize_4bit(packed, state, x.dtype), bias)` (`lorakit.quant.nf4`), which is
what `Linear4bit`'s forward computes (tests/test_triton_kernels.py compares them). Each weight tile is
dequantized in registers by `triton_nf4.dequant_values` (same fp32 arithmetic), rounded to x's dtype like
the reference's W, and accumulated in fp32.

`gemv`: decode (a few rows): one program per (row, BLOCK_N outputs) streams its W rows once; the
weight is read as 4-bit bytes, a quarter of bf16 W's traffic, which is what makes batch-1 decoding
faster than a bf16 matmul. `tiled`: more rows, [BLOCK_M, BLOCK_N] output tiles by `tl.dot`, W
dequantized tile by tile into the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lorakit import kernels
from lorakit.kernels.triton_nf4 import (
    Blockwise4bit,
    cast_rtne,
    dequant_values,
    dequantize_4bit_triton,
    dot,
    interpreting,
    kernel_args,
    launch,
)

GEMV_MAX_ROWS = 4  # up to this many rows: `gemv` (one pass over W per row); more: `tiled`
# Block sizes: picked so that ptxas (sm_90) compiles every kernel without register spills; untuned for speed
FUSED_MAX_ROWS = 16  # `linear_4bit` above this: dequantize once (Triton), then cuBLAS


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                 blocksize, nested_blocksize, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
                 NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        xk = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0)
        idx = n[:, None].to(tl.int64) * K + k[None, :]  # [BN, BK] flat indices of W[n, k]
        mask = (n[:, None] < N) & (k[None, :] < K)
        w = dequant_values(idx, mask, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset_ptr, blocksize, nested_blocksize, NESTED)  # fmt: skip
        w = cast_rtne(w, xk.dtype).to(tl.float32)  # W in x's dtype, as the reference dequantizes it
        acc += tl.sum(w * xk.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _tiled_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                  blocksize, nested_blocksize, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                  NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # [BM, BK]
        idx = n[None, :].to(tl.int64) * K + k[:, None]  # [BK, BN]: W^T tile
        mask = (k[:, None] < K) & (n[None, :] < N)
        w = dequant_values(idx, mask, packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset_ptr, blocksize, nested_blocksize, NESTED)  # fmt: skip
        acc = dot(x, cast_rtne(w, x.dtype), acc, PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


def matmul_4bit(x: Tensor, packed: Tensor, state: Blockwise4bit, bias: Tensor | None = None,
                tiled: bool | None = None) -> Tensor:  # fmt: skip
    """x [..., in] -> [..., out] in x's dtype; `tiled` None picks by row count (GEMV_MAX_ROWS)."""
    if len(state.shape) != 2:
        raise ValueError(f"a 4-bit matmul needs a 2-d weight, got shape {tuple(state.shape)}")
    n_out, k_in = state.shape
    if x.shape[-1] != k_in:
        raise ValueError(f"input has {x.shape[-1]} features, the 4-bit weight {tuple(state.shape)} takes {k_in}")
    args = kernel_args(packed, state)
    x2 = x.reshape(-1, k_in).contiguous()  # [M, K]
    rows = x2.shape[0]
    result = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)  # [..., N], not a view: see
    out = result.view(rows, n_out)  # [M, N], what the kernels write                kernels.linear
    if rows == 0:
        return result
    common = dict(NESTED=args[8], HAS_BIAS=bias is not None)
    bias_arg = bias if bias is not None else out
    if not (rows > GEMV_MAX_ROWS if tiled is None else tiled):
        grid = (triton.cdiv(n_out, 32), rows)
        _gemv_kernel[grid](x2, *args[:8], bias_arg, out, n_out, k_in, x2.stride(0), out.stride(0),
                           BLOCK_N=32, BLOCK_K=128, **common, **launch(num_warps=8))  # fmt: skip
    else:
        # fp32 (no tensor cores for exact fp32): small tiles, or the registers spill (ptxas, sm_90)
        block_m, block_k = (16, 16) if x.dtype == torch.float32 else (16 if rows <= 16 else 64, 32)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(n_out, 64))
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32: no TF32, like torch's default matmul
        _tiled_kernel[grid](x2, *args[:8], bias_arg, out, rows, n_out, k_in, x2.stride(0), out.stride(0),
                            PRECISION=precision, INTERPRET=interpreting(),
                            BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, **common)  # fmt: skip
    return result


def linear_4bit(x: Tensor, packed: Tensor, state: Blockwise4bit, bias: Tensor | None = None) -> Tensor:
    """What `Linear4bit` runs on CUDA: the fused matmul for up to FUSED_MAX_ROWS rows (decoding), else
    W dequantized by one Triton kernel into a cuBLAS matmul (training and prefill: compute-bound, where
    the matmul, not reading W, dominates). Not tuned on a GPU yet: see docs/BENCHMARKS.md."""
    if x.numel() // max(x.shape[-1], 1) <= FUSED_MAX_ROWS:
        return matmul_4bit(x, packed, state, bias)
    return kernels.linear(x, dequantize_4bit_triton(packed, state, x.dtype), bias)
