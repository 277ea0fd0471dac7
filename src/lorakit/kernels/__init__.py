"""Fast paths for the training hot loop, each beside (and tested against) its plain PyTorch reference.

`linear_ce`: LM head + cross entropy in token chunks, so the full [tokens, vocab] logits never exist.
`lora_linear`: a LoRA update as one autograd node whose intermediates stay rank-sized.
`dequant`: 4-bit dequantization through a byte table (bit-exact with `quant.nf4`).

The library uses them by default; `LORAKIT_KERNELS=0` in the environment forces every plain path
(for comparison, or to rule a kernel out when debugging).
"""

from __future__ import annotations

import os


def enabled() -> bool:
    """Whether fast paths are on (the default); read on every call, so it can be switched at run time."""
    return os.environ.get("LORAKIT_KERNELS", "1") != "0"
