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


def lora_linear(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """base_out + scale * (x A^T) B^T for x [..., in], base_out [..., out]; differentiable in all four."""
    return _LoraLinear.apply(x, base_out, lora_A, lora_B, scale)


def lora_linear_reference(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """The plain-PyTorch formula `lora_linear` must equal (what LoraAdapter.forward computes)."""
    delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_A.dtype), lora_A), lora_B) * scale
    return base_out + delta.to(base_out.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        hs = (x2.to(lora_A.dtype) @ lora_A.T).mul_(scale)  # [tokens, r]
        base2 = base_out.reshape(-1, base_out.shape[-1])  # [tokens, out]
        if base_out.dtype == lora_B.dtype:
            y = torch.addmm(base2, hs, lora_B.T)  # one [tokens, out] tensor
        else:
            y = base2 + (hs @ lora_B.T).to(base_out.dtype)
        ctx.save_for_backward(x, hs, lora_A, lora_B)
        ctx.scale = scale
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, hs, lora_A, lora_B = ctx.saved_tensors
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
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
        return grad_x, grad_y if need_base else None, grad_A, grad_B, None
