"""A LoRA update added to a base layer's output, as one autograd node.

    y = base_out + scale * (x A^T) B^T          A: [r, in], B: [out, r]

The plain path (`F.linear(F.linear(x, A), B) * scale`, then `base_out + delta`) makes three
[tokens, out] tensors in forward and two more in backward. Here the scale is applied to the
rank-r intermediate and the product is added with one `addmm`, and backward brackets every
product so that only [tokens, r] intermediates are made:

    dh = scale * (dy B)        [tokens, r]
    dx = dh A                  [tokens, in]
    dA = dh^T x                [r, in]
    dB = dy^T (scale * h)      [out, r]

Saved for backward: x (shared with the base layer's graph, no copy) and scale * h ([tokens, r]).
Dropout stays outside: pass `dropout(x)`; with no dropout, x itself is saved and nothing is copied.
BA is never formed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_linear(
    x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, inplace: bool = False
) -> Tensor:
    """base_out + scale * (x A^T) B^T for x [..., in], base_out [..., out]; differentiable in all four.

    `inplace` adds into base_out itself (no [tokens, out] copy): only for a base_out nobody else
    reads afterwards, e.g. a layer's output with one plain LoRA adapter active.
    """
    return _LoraLinear.apply(base_out, x, lora_A, lora_B, scale, inplace and may_modify_inplace(base_out))


def may_modify_inplace(t: Tensor) -> bool:
    """Whether autograd lets `t` be modified in place. It forbids it, with grad mode on, for a view made
    where autograd could not record it (inside a custom Function's forward, or in no-grad mode): its base
    then tracks no history, and rebasing the view would bypass that Function's backward."""
    base = t._base
    return base is None or not torch.is_grad_enabled() or not t.requires_grad or base.requires_grad


def lora_linear_reference(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """The plain-PyTorch formula `lora_linear` must equal (what LoraAdapter.forward computes)."""
    delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_A.dtype), lora_A), lora_B) * scale
    return base_out + delta.to(base_out.dtype)


class _LoraLinear(torch.autograd.Function):
    """base_out comes first: autograd expects the tensor a function changes in place there (when that
    tensor is a view, e.g. a Conv1D output, its history is rebased on the first input's gradient)."""

    @staticmethod
    def forward(ctx, base_out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                inplace: bool) -> Tensor:  # fmt: skip
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        hs = (x2.to(lora_A.dtype) @ lora_A.T).mul_(scale)  # [tokens, r]
        ctx.save_for_backward(x, hs, lora_A, lora_B)
        ctx.scale = scale
        same_dtype = base_out.dtype == lora_B.dtype
        if inplace and same_dtype and base_out.is_contiguous():
            ctx.mark_dirty(base_out)
            base_out.view(-1, base_out.shape[-1]).addmm_(hs, lora_B.T)  # accumulate into base_out
            return base_out
        base2 = base_out.reshape(-1, base_out.shape[-1])  # [tokens, out]
        if same_dtype:
            return torch.addmm(base2, hs, lora_B.T).view(base_out.shape)  # one new [tokens, out] tensor
        return (base2 + (hs @ lora_B.T).to(base_out.dtype)).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, hs, lora_A, lora_B = ctx.saved_tensors
        need_base, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(lora_B.dtype)  # [tokens, out]
        grad_x = grad_A = grad_B = None
        if need_x or need_A:
            dh = (g @ lora_B).mul_(ctx.scale)  # [tokens, r]
            if need_x:
                grad_x = (dh @ lora_A).to(x.dtype).view(x.shape)  # [..., in]
            if need_A:
                grad_A = dh.T @ x.reshape(-1, x.shape[-1]).to(lora_A.dtype)  # [r, in]
        if need_B:
            grad_B = g.T @ hs  # [out, r]
        return grad_y if need_base else None, grad_x, grad_A, grad_B, None, None
