"""Cross entropy of a linear head, summed over tokens, computed chunk by chunk.

    loss = sum_i  logsumexp(W h_i + b) - (W h_i + b)[label_i]

The plain path materializes logits [tokens, vocab] (and autograd keeps a softmax of the same
size for backward). Here each chunk of tokens makes its logits, adds its share of the loss and,
when gradients are wanted, its gradients right away (d loss / d logits = softmax - onehot), so
only one chunk of logits exists at a time and backward only scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, chunk_tokens: int | None = None
) -> Tensor:
    """Summed cross entropy of `F.linear(hidden, weight, bias)` against `labels`, in fp32.

    hidden: [tokens, d]; weight: [vocab, d]; labels: [tokens], every one a valid class (select the
    supervised positions first). `chunk_tokens` defaults to about 8M logits per chunk.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens)


def softmax_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax, logsumexp) of fp32 logits [c, vocab] along the vocabulary, the softmax written over
    the logits: five passes over the chunk and no extra [c, vocab] buffer."""
    peak = logits.amax(dim=1, keepdim=True)  # [c, 1]
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=1, keepdim=True)  # [c, 1]
    return probs.div_(total), (total.log() + peak).squeeze(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and its gradients in one pass over token chunks; backward scales what forward stored."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # [tokens, d]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # [c, d]
            y = labels[start : start + chunk]  # [c]
            logits = F.linear(h, weight, bias).float()  # [c, vocab]
            target = logits.gather(1, y[:, None]).squeeze(1)  # [c]
            if not (need_h or need_w or need_b):
                loss += (torch.logsumexp(logits, dim=1) - target).sum()
                continue
            g, lse = softmax_(logits)  # in place: the logits become the softmax
            loss += (lse - target).sum()
            # d loss / d logits = softmax - onehot
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if need_h:
                grad_h[start : start + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.T @ h.float()
            if need_b:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # free them with the graph
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None
