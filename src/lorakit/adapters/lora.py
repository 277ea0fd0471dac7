"""Plain LoRA: one low-rank update of one frozen weight.

    delta(x) = scale * B A dropout(x),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A: [r, in], B: [out, r]. B starts at zero, so a fresh adapter leaves the model unchanged.
For an embedding, "in" is the vocabulary and A is looked up by token id instead of multiplied,
which is why PEFT zero-initialises A and draws B at random there.

An adapter kind is this class or a subclass overriding a few hooks, which the wrapper calls:
`init_from_base` (init that reads or changes the base), `contribution` (what it adds to the base
output), `merged_weight` / `unmerged_weight` (fold into / take out of the base weight); a kind
with other factors or another scale (AdaLoRA) overrides `add_factors`, `reset_parameters` and `scale`
and keeps this constructor.
PiSSA (`init="pissa"`) starts from the top-r singular triplets of W and leaves the residual in
the base; the initial factors are kept (`lora_A0`, `lora_B0`) so that saving can convert the
adapter into a plain one for the untouched base.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lorakit.adapters.layer import LoraLayer


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraAdapter(nn.Module):
    """The two factors of one adapter on one layer, and how they contribute."""

    reads_base_weight = False  # its contribution does not depend on the base weight

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
        self.r, self.alpha, self.rslora, self.embedding, self.init = r, alpha, rslora, embedding, init
        self.add_factors(in_features, out_features, dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)  # drawn on the CPU, as PEFT does: a seed gives the same adapter on any device
        if device is not None:
            self.to(device)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def add_factors(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """The trainable factors, drawn by `reset_parameters`: A [r, in], B [out, r]."""
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, dtype=dtype))

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

    @torch.no_grad()
    def init_from_base(self, layer: LoraLayer) -> None:
        """Initialisation that needs the base layer: PiSSA (for the rest, nothing to do)."""
        if self.init == "pissa":
            pissa_init(self, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] features (or [...] token ids for an embedding) -> scale * B A dropout(x): [..., out]."""
        return self.low_rank(x if self.embedding else self.dropout(x.to(self.lora_A.dtype)))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B A x, without dropout."""
        h = F.embedding(x, self.lora_A.T) if self.embedding else F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return F.linear(h, self.lora_B) * self.scale  # h: [..., r]

    def contribution(self, x: torch.Tensor, base_out: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
        """What this adapter adds to the base layer's output `base_out` for input `x`."""
        return self(x)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A as an [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight [out, in] with this adapter folded in: W + scale * B A."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)

    def peft_names(self) -> dict[str, str]:
        """PEFT's key suffix for each of our parameters (adapter name stripped, as saved)."""
        if self.embedding:
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


@torch.no_grad()
def pissa_init(adapter: LoraAdapter, layer: LoraLayer) -> None:
    """PEFT's `init_lora_weights="pissa"`: with W = U S V^T, B = U_r sqrt(S_r / scale),
    A = sqrt(S_r / scale) V_r^T, and the base weight becomes W - scale * B A, so the model's
    output is unchanged. An embedding keeps its usual init (as in PEFT)."""
    if layer.kind == "linear4bit":
        raise ValueError("init='pissa' needs a full-precision base weight (PiSSA's SVD before quantizing)")
    if not adapter.embedding:
        weight = layer.weight_oi(torch.float32)  # [out, in]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[: adapter.r] / adapter.scale).sqrt()  # [r]
        adapter.lora_A.copy_(root[:, None] * vh[: adapter.r])  # [r, in]
        adapter.lora_B.copy_(u[:, : adapter.r] * root)  # [out, r]
        layer.set_weight_oi(weight - adapter.delta_weight().float())
    adapter.register_buffer("lora_A0", adapter.lora_A.detach().clone())
    adapter.register_buffer("lora_B0", adapter.lora_B.detach().clone())
