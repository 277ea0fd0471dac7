"""Mixed-adapter LoRA in Triton: every token through its own adapter in one launch per product.

    y[t] += scale[a] * B[a] (A[a] x[t]),   a = the adapter of token t (none: y[t] unchanged)

The adapters' factors are stacked, zero-padded to the largest rank R: A [n, R, in], B [n, out, R],
with each adapter's own rank in `ranks` (loads past it are masked off). Two layouts of "which
adapter", as in Punica / S-LoRA:

  BGMV  one adapter index per token (decode: one token per row), `adapter` [T] (-1 = none);
  SGMV  segments of consecutive tokens sharing an adapter (prefill: a row's tokens),
        `seg_start` [S + 1], `seg_adapter` [S]; each segment's tokens go through `tl.dot` tiles.

Each runs as shrink (h = x A^T, [T, R] in the adapters' dtype, like the reference) then expand
(y += scale * h B^T, added to y in its dtype like `base_out + delta.to(base_out.dtype)`).
Reference: `lora_rows_reference`, the math of `lorakit.multi.routing.RowRouting.apply` for plain
LoRA adapters (per adapter: gather its rows, low-rank product, scatter-add). Forward only (serving,
no autograd); `routed_lora` is the CUDA branch of `RowRouting.apply`, which decides which adapters it
takes and hands it their factors: this module imports nothing of `lorakit.adapters`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from lorakit.kernels import FactorCache
from lorakit.kernels.triton_nf4 import cast_rtne, dot, interpreting


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, ranks_ptr, adapter_ptr, h_ptr, K, R, stride_xt, stride_an, stride_ht,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    a = tl.load(adapter_ptr + t)
    if a >= 0:  # rows of no adapter: h stays unwritten (expand skips them too)
        rank = tl.load(ranks_ptr + a)
        r = tl.arange(0, BLOCK_R)  # [BR]
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_ptr + t * stride_xt + k, mask=k < K, other=0.0)
            w = tl.load(a_ptr + a.to(tl.int64) * stride_an + r[:, None] * K + k[None, :],
                        mask=(r[:, None] < rank) & (k[None, :] < K), other=0.0)  # [BR, BK]
            x = x.to(w.dtype).to(tl.float32)  # x in the adapters' dtype, as the reference casts it
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(h_ptr + t * stride_ht + r, cast_rtne(acc, h_ptr.dtype.element_ty), mask=r < R)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, ranks_ptr, adapter_ptr, scales_ptr, y_ptr, N, R, stride_ht, stride_bn,
                        stride_yt, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    a = tl.load(adapter_ptr + t)
    if a >= 0:
        rank = tl.load(ranks_ptr + a)
        scale = tl.load(scales_ptr + a)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        r = tl.arange(0, BLOCK_R)  # [BR]
        h = tl.load(h_ptr + t * stride_ht + r, mask=r < rank, other=0.0).to(tl.float32)
        w = tl.load(b_ptr + a.to(tl.int64) * stride_bn + n[:, None] * R + r[None, :],
                    mask=(n[:, None] < N) & (r[None, :] < rank), other=0.0)  # [BN, BR]
        delta = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        delta = cast_rtne(delta, w.dtype).to(tl.float32) * scale  # the reference: F.linear(h, B) * scale
        _add_into(y_ptr + t * stride_yt + n, delta, n < N)


@triton.jit
def _add_into(ptrs, delta, mask):
    """*ptrs = *ptrs + delta rounded to y's dtype first (`base_out + delta.to(base_out.dtype)`)."""
    dtype = ptrs.dtype.element_ty
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, cast_rtne(y + cast_rtne(delta, dtype).to(tl.float32), dtype), mask=mask)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, ranks_ptr, seg_start_ptr, seg_adapter_ptr, h_ptr, K, R, stride_xt,
                        stride_an, stride_ht, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    s = tl.program_id(0)
    a = tl.load(seg_adapter_ptr + s)
    start = tl.load(seg_start_ptr + s)
    end = tl.load(seg_start_ptr + s + 1)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    if a >= 0 and start + tl.program_id(1) * BLOCK_M < end:
        rank = tl.load(ranks_ptr + a)
        r = tl.arange(0, BLOCK_R)  # [BR]
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BK]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + k[None, :],
                        mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0)  # [BM, BK]
            w = tl.load(a_ptr + a.to(tl.int64) * stride_an + r[None, :] * K + k[:, None],
                        mask=(r[None, :] < rank) & (k[:, None] < K), other=0.0)  # [BK, BR]: A^T tile
            acc = dot(x.to(w.dtype), w, acc, PRECISION, INTERPRET)
        h = h_ptr + rows[:, None].to(tl.int64) * stride_ht + r[None, :]
        tl.store(h, cast_rtne(acc, h_ptr.dtype.element_ty), mask=(rows[:, None] < end) & (r[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(h_ptr, b_ptr, ranks_ptr, seg_start_ptr, seg_adapter_ptr, scales_ptr, y_ptr, N, R,
                        stride_ht, stride_bn, stride_yt, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    s = tl.program_id(0)
    a = tl.load(seg_adapter_ptr + s)
    start = tl.load(seg_start_ptr + s)
    end = tl.load(seg_start_ptr + s + 1)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    if a >= 0 and start + tl.program_id(1) * BLOCK_M < end:
        rank = tl.load(ranks_ptr + a)
        scale = tl.load(scales_ptr + a)
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        r = tl.arange(0, BLOCK_R)  # [BR]
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_ht + r[None, :],
                    mask=(rows[:, None] < end) & (r[None, :] < rank), other=0.0)  # [BM, BR]
        w = tl.load(b_ptr + a.to(tl.int64) * stride_bn + n[None, :] * R + r[:, None],
                    mask=(n[None, :] < N) & (r[:, None] < rank), other=0.0)  # [BR, BN]: B^T tile
        delta = dot(h, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, INTERPRET)
        delta = cast_rtne(delta, w.dtype).to(tl.float32) * scale
        y = y_ptr + rows[:, None].to(tl.int64) * stride_yt + n[None, :]
        _add_into(y, delta, (rows[:, None] < end) & (n[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def stack_adapters(lora_A: list[Tensor], lora_B: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """A [n, R, in], B [n, out, R] zero-padded to the largest rank R, and the ranks [n] int32."""
    if not lora_A or len(lora_A) != len(lora_B):
        raise ValueError(f"need one B per A and at least one adapter, got {len(lora_A)} A and {len(lora_B)} B")
    rank = max(a.shape[0] for a in lora_A)
    dtype = lora_A[0].dtype if all(t.dtype == lora_A[0].dtype for t in lora_A + lora_B) else torch.float32
    a_stack = torch.stack([nn.functional.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in lora_A])
    b_stack = torch.stack([nn.functional.pad(b.to(dtype), (0, rank - b.shape[1])) for b in lora_B])
    ranks = torch.tensor([a.shape[0] for a in lora_A], dtype=torch.int32, device=a_stack.device)
    return a_stack.contiguous(), b_stack.contiguous(), ranks


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot takes dimensions of at least 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_bgmv(y: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scales: Tensor,
              adapter: Tensor) -> Tensor:  # fmt: skip
    """y [T, out] += scale[a] * B[a] A[a] x[t] for a = adapter[t] >= 0, in place; returns y. x [T, in]."""
    tokens, k_in = x.shape
    n_adapters, rank, _ = a_stack.shape
    n_out = b_stack.shape[1]
    _check(y, x, a_stack, b_stack, ranks, scales)
    adapter = adapter.to(device=x.device, dtype=torch.int32).contiguous()
    x = x.contiguous()
    h = torch.empty(tokens, rank, dtype=a_stack.dtype, device=x.device)  # [T, R]
    if tokens == 0:
        return y
    block_r = triton.next_power_of_2(rank)
    _bgmv_shrink_kernel[(tokens,)](x, a_stack, ranks, adapter, h, k_in, rank, x.stride(0), a_stack.stride(0),
                                   h.stride(0), BLOCK_R=block_r, BLOCK_K=64)  # fmt: skip
    _bgmv_expand_kernel[(tokens, triton.cdiv(n_out, 64))](h, b_stack, ranks, adapter, scales, y, n_out, rank,
                                                          h.stride(0), b_stack.stride(0), y.stride(0),
                                                          BLOCK_N=64, BLOCK_R=block_r)  # fmt: skip
    return y


def lora_sgmv(y: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scales: Tensor,
              seg_start: Tensor, seg_adapter: Tensor, max_len: int | None = None) -> Tensor:  # fmt: skip
    """y [T, out] += scale[a] * B[a] A[a] x[t] for the tokens t of each segment s with adapter a =
    seg_adapter[s] >= 0 (tokens seg_start[s] .. seg_start[s + 1] - 1), in place; returns y.
    `max_len`: the longest segment (read from seg_start, a host sync, when not given)."""
    tokens, k_in = x.shape
    n_adapters, rank, _ = a_stack.shape
    n_out = b_stack.shape[1]
    _check(y, x, a_stack, b_stack, ranks, scales)
    seg_start = seg_start.to(device=x.device, dtype=torch.int32).contiguous()
    seg_adapter = seg_adapter.to(device=x.device, dtype=torch.int32).contiguous()
    segments = seg_adapter.numel()
    if seg_start.numel() != segments + 1:
        raise ValueError(f"seg_start needs {segments + 1} entries for {segments} segments, got {seg_start.numel()}")
    if max_len is None:
        max_len = int((seg_start[1:] - seg_start[:-1]).max()) if segments else 0
    if tokens == 0 or segments == 0 or max_len == 0:
        return y
    x = x.contiguous()
    h = torch.empty(tokens, rank, dtype=a_stack.dtype, device=x.device)  # [T, R]
    block_m = 16 if max_len <= 16 else 32
    block_r = _block_r(rank)
    common = dict(PRECISION=_precision(a_stack.dtype), INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_R=block_r)
    grid = (segments, triton.cdiv(max_len, block_m))
    _sgmv_shrink_kernel[grid](x, a_stack, ranks, seg_start, seg_adapter, h, k_in, rank, x.stride(0),
                              a_stack.stride(0), h.stride(0), BLOCK_K=32, **common)  # fmt: skip
    _sgmv_expand_kernel[(*grid, triton.cdiv(n_out, 64))](h, b_stack, ranks, seg_start, seg_adapter, scales, y,
                                                         n_out, rank, h.stride(0), b_stack.stride(0), y.stride(0),
                                                         BLOCK_N=64, **common)  # fmt: skip
    return y


def _check(y: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, ranks: Tensor, scales: Tensor) -> None:
    n, rank, k_in = a_stack.shape
    if x.dim() != 2 or x.shape[1] != k_in:
        raise ValueError(f"x must be [tokens, {k_in}], got {tuple(x.shape)}")
    if b_stack.shape[0] != n or b_stack.shape[2] != rank or not b_stack.is_contiguous() or not a_stack.is_contiguous():
        raise ValueError(f"A {tuple(a_stack.shape)} and B {tuple(b_stack.shape)} are not contiguous stacks alike")
    if y.shape != (x.shape[0], b_stack.shape[1]) or y.stride(1) != 1:
        raise ValueError(f"y must be [{x.shape[0]}, {b_stack.shape[1]}] with unit column stride, got {tuple(y.shape)}")
    if ranks.numel() != n or scales.numel() != n or scales.dtype != torch.float32:
        raise ValueError(f"need {n} int32 ranks and {n} float32 scales")


def lora_rows_reference(y: Tensor, x: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], scales: list[float],
                        adapter: Tensor) -> Tensor:  # fmt: skip
    """Plain PyTorch: y [T, out] plus, for each adapter a, scale * (x[rows] A^T) B^T on its rows
    (adapter[t] == a), as `RowRouting.apply` adds `LoraAdapter.low_rank`; a new tensor."""
    out = y.clone()
    for a, (A, B, scale) in enumerate(zip(lora_A, lora_B, scales, strict=True)):
        rows = (adapter == a).nonzero().reshape(-1)
        if rows.numel():
            xa = x.index_select(0, rows)
            delta = nn.functional.linear(nn.functional.linear(xa.to(A.dtype), A), B) * scale
            out.index_add_(0, rows, delta.to(y.dtype))
    return out


def segment_adapters(seg_start: Tensor, seg_adapter: Tensor) -> Tensor:
    """The per-token adapter index [T] of a segment layout (for checking SGMV against BGMV/the reference)."""
    lengths = (seg_start[1:] - seg_start[:-1]).long()
    return torch.repeat_interleave(seg_adapter.long(), lengths)


# ---------------------------------------------------------------------------------------------
# The routed layer (CUDA branch of RowRouting.apply)
# ---------------------------------------------------------------------------------------------

_STACKS = FactorCache()  # layer -> the stacks of its last routed adapters


def routed_lora(key: object, factors: list[tuple[Tensor, Tensor, float]], rows_of: list[Tensor | None],
                x: Tensor, base_out: Tensor) -> Tensor:  # fmt: skip
    """base_out + scale_j * B_j A_j x on the rows of adapter j, for each (A_j [r_j, in], B_j [out, r_j],
    scale_j) in `factors` (plain LoRA on a linear layer); `rows_of[j]`: its row indices, None = every row.
    By BGMV (one token per row) or SGMV (each row a segment). `key`: what the stacked factors are cached
    under (the layer), until a factor is replaced or changed in place. Forward only: call it without
    autograd. x [rows, ..., in], base_out [rows, ..., out]."""
    rows = x.shape[0]
    a_stack, b_stack, ranks, scales = _stacks(key, factors, x.device)
    adapter = torch.full((rows,), -1, dtype=torch.int32, device=x.device)
    for j, index in enumerate(rows_of):
        adapter[index if index is not None else slice(None)] = j
    per_row = x[0].numel() // x.shape[-1]  # tokens per row
    y = base_out.reshape(rows * per_row, base_out.shape[-1]).clone()  # [T, out]
    x2 = x.reshape(rows * per_row, x.shape[-1])  # [T, in]
    if per_row == 1:
        lora_bgmv(y, x2, a_stack, b_stack, ranks, scales, adapter)
    else:
        seg_start = torch.arange(rows + 1, dtype=torch.int32, device=x.device) * per_row
        lora_sgmv(y, x2, a_stack, b_stack, ranks, scales, seg_start, adapter, max_len=per_row)
    return y.view(base_out.shape)


def _stacks(key: object, factors: list[tuple[Tensor, Tensor, float]], device: torch.device) -> tuple:
    """The stacked `factors`, cached under `key` until a factor changes (or is replaced)."""
    def build() -> tuple:
        a_stack, b_stack, ranks = stack_adapters([A.detach() for A, _, _ in factors],
                                                 [B.detach() for _, B, _ in factors])  # fmt: skip
        scales = torch.tensor([scale for _, _, scale in factors], dtype=torch.float32, device=device)
        return a_stack, b_stack, ranks, scales

    tensors = [t for A, B, _ in factors for t in (A, B)]
    return _STACKS.get(key, tensors, tuple(scale for _, _, scale in factors), build)
