"""Plain LoRA: one low-rank update of one frozen weight.

    delta(x) = scale * B A dropout(x),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A: [r, in], B: [out, r]. B starts at zero, so a fresh adapter leaves the model unchanged.
For an embedding, "in" is the vocabulary and A is looked up by token id instead of multiplied,
which is why PEFT zero-initialises A and draws B at random there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraAdapter(nn.Module):
    """The two factors of one adapter on one layer, and how they contribute."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        embedding: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.r, self.alpha, self.rslora, self.embedding = r, alpha, rslora, embedding
        self.scale = lora_scale(r, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if self.embedding:  # PEFT's embedding init: A = 0, B ~ N(0, 1)
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] features (or [...] token ids for an embedding) -> [..., out]."""
        if self.embedding:
            h = F.embedding(x, self.lora_A.T)  # [..., r]
        else:
            h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # [..., r]
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B A as an [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scale

    def peft_names(self) -> dict[str, str]:
        """PEFT's key suffix for each of our parameters (adapter name stripped, as saved)."""
        if self.embedding:
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
