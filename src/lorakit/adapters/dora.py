"""DoRA: weight-decomposed LoRA (Liu et al. 2024) — a learned magnitude per output row.

    W' = m * (W + s B A) / ||W + s B A||        norm per output row of the [out, in] weight

m: [out], initialised to the row norms, so a fresh adapter leaves the model unchanged. The norm
is treated as a constant in backward (paper, section 4.3), as PEFT does. The forward reuses the
base output instead of a second base matmul:

    y = W' x + b = base(x) + (m/n - 1) (base(x) - b) + (m/n) s B A x,   n = ||W + s B A||

With dropout in training, the adapter sees dropout(x) and so does the (m/n - 1) W term, which then
needs its own base call on dropout(x) (PEFT's formula). The norm is computed from
W A^T ([out, r]) and A A^T ([r, r]) without building B A, and cached in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.adapters.lora import LoraAdapter
from lorakit.kernels.lora_linear import lora_linear

if TYPE_CHECKING:
    from lorakit.adapters.layer import LoraLayer


class DoraAdapter(LoraAdapter):
    """LoRA factors plus DoRA's magnitude vector; the update rescales each output row to m."""

    reads_base_weight = True  # its contribution depends on the base weight (through the norm)

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, **kwargs) -> None:
        super().__init__(in_features, out_features, r, alpha, **kwargs)
        self.magnitude = nn.Parameter(torch.ones(out_features, device=self.lora_A.device, dtype=self.lora_A.dtype))
        self.norm_cache: tuple[tuple, torch.Tensor] | None = None  # (key, norm) in eval mode
        self.base_sq_cache: tuple[tuple, torch.Tensor] | None = None  # (key, ||W_i||^2): W is frozen
        self.merge_norm: torch.Tensor | None = None  # the norm the merge divided by, for unmerge

    @torch.no_grad()
    def init_from_base(self, layer: LoraLayer) -> None:
        """m = ||W + s B A|| per row (after any init that changes W or B A, such as PiSSA)."""
        super().init_from_base(layer)
        self.magnitude.copy_(row_norm(layer.weight_oi(torch.float32), self.lora_A, self.lora_B, self.scale))

    def contribution(self, x: torch.Tensor, base_out: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
        dtype = self.lora_A.dtype
        if self.training and isinstance(self.dropout, nn.Dropout) and not self.embedding:
            x = self.dropout(x.to(dtype))
            base_out = layer.base_module(x.to(base_out.dtype))  # W dropout(x) + b
        wx = layer.without_bias(base_out).to(dtype)  # [..., out]
        ratio = self.magnitude / self.weight_norm(layer)  # [out]; the norm carries no gradient
        return (ratio - 1) * wx + ratio * self.low_rank(x)

    def apply_alone(self, x: torch.Tensor, base_out: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
        """The layer's output with this adapter as its only active one, no dropout at work (the fast path):

            y = (m/n) (W x + s B A x) + b

        as one in-place LoRA node (`lora_linear`) and one scaling by m/n: two [tokens, out] tensors in
        forward where `contribution` plus the layer's sum make five."""
        z = lora_linear(x, layer.without_bias(base_out), self.lora_A, self.lora_B, self.scale, inplace=True)
        y = z * (self.magnitude / self.weight_norm(layer)).to(z.dtype)  # [..., out]
        bias = layer._parameters.get("bias")
        return y if bias is None else y.add_(bias.to(y.dtype))

    def weight_norm(self, layer: LoraLayer) -> torch.Tensor:
        """||W + s B A|| per output row, detached; reused in eval mode while W, A, B are unchanged."""
        if self.training:
            self.norm_cache = None
            return self.compute_norm(layer)
        key = cache_key(layer, self)
        if self.norm_cache is None or self.norm_cache[0] != key:
            self.norm_cache = (key, self.compute_norm(layer))
        return self.norm_cache[1]

    @torch.no_grad()
    def compute_norm(self, layer: LoraLayer) -> torch.Tensor:
        dtype = self.lora_A.dtype
        weight = layer.weight_oi(dtype)
        key = (*base_key(layer), dtype)
        if self.base_sq_cache is None or self.base_sq_cache[0] != key:
            self.base_sq_cache = (key, weight.square().sum(1))  # [out]; changes only with W
        return row_norm(weight, self.lora_A, self.lora_B, self.scale, self.base_sq_cache[1]).to(dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A|| * (W + s B A); the norm is kept so that unmerge can invert it."""
        updated = weight + self.delta_weight().to(weight.dtype)  # [out, in]
        self.merge_norm = torch.linalg.vector_norm(updated, dim=1)  # [out]
        return (self.magnitude.to(weight.dtype) / self.merge_norm)[:, None] * updated

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W = W' * n / m - s B A, with n the norm of the merge."""
        if self.merge_norm is None:
            raise ValueError("this DoRA adapter was not merged, so there is nothing to take out")
        ratio = self.merge_norm.to(weight.dtype) / self.magnitude.to(weight.dtype)  # [out]
        self.merge_norm = None
        return ratio[:, None] * weight - self.delta_weight().to(weight.dtype)

    def peft_names(self) -> dict[str, str]:
        return {**super().peft_names(), "magnitude": "lora_magnitude_vector"}


@torch.no_grad()
def row_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
             weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A|| per row of W [out, in], without building B A:
    ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T   (`weight_sq`: ||W_i||^2, if known)."""
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    wa = weight @ a.T  # [out, r]
    weight_sq = weight.square().sum(1) if weight_sq is None else weight_sq
    squared = weight_sq + 2 * scale * (b * wa).sum(1) + scale**2 * ((b @ (a @ a.T)) * b).sum(1)
    return squared.clamp_min(0).sqrt()  # [out]


def base_key(layer: LoraLayer) -> tuple:
    """Changes whenever the base weight (or its 4-bit state) is replaced or modified in place."""
    return layer.weight.data_ptr(), layer.weight._version, layer.weight.dtype, id(getattr(layer, "quant_state", None))


def cache_key(layer: LoraLayer, adapter: DoraAdapter) -> tuple:
    """Changes whenever the base weight or a factor is replaced or modified in place."""
    factors = (adapter.lora_A, adapter.lora_B)
    return base_key(layer) + tuple((t.data_ptr(), t._version, t.dtype) for t in factors)
