"""Fast paths for the training hot loop, each beside (and tested against) its plain PyTorch reference.

`linear_ce`: LM head + cross entropy in token chunks, so the full [tokens, vocab] logits never exist.
`lora_linear`: a LoRA update as one autograd node whose intermediates stay rank-sized.
`dequant`: 4-bit dequantization through a byte table (bit-exact with `quant.nf4`).
`triton_nf4`, `triton_matmul4bit`, `triton_lora`: GPU kernels (Triton) for 4-bit dequantization, the
fused 4-bit matmul and mixed-adapter LoRA (SGMV/BGMV), used for CUDA tensors when triton imports
(`use_triton`); triton stays optional, and nothing changes on the CPU.

The library uses them by default; `LORAKIT_KERNELS=0` in the environment forces every plain path
(for comparison, or to rule a kernel out when debugging).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable

import torch


def enabled() -> bool:
    """Whether fast paths are on (the default); read on every call, so it can be switched at run time."""
    return os.environ.get("LORAKIT_KERNELS", "1") != "0"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensor `t`: fast paths on, `t` on CUDA and triton importable.

    `LORAKIT_KERNELS=triton` forces them for CPU tensors too, which only works through Triton's
    interpreter (TRITON_INTERPRET=1 before the kernel modules are imported): how the tests run them
    without a GPU.
    """
    mode = os.environ.get("LORAKIT_KERNELS", "1")
    return mode != "0" and (t.is_cuda or mode == "triton") and triton_available()


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed and imports (it is optional: the CUDA builds of torch bring it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install: any error means no Triton kernels)
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, bit for bit, but its result is its own tensor, never a view of one made inside it; for a
    custom autograd Function's forward (it writes through `out=`, which autograd does not record).

    F.linear with a bias on a [..., in] input returns a view of its 2-d `addmm` result. Returned from a
    custom Function, such a view cannot be modified in place afterwards (autograd forbids it: the rebase
    would bypass the Function's backward), which the in-place LoRA node (`lora_linear`) does to a layer's
    output. Here the same `addmm` writes into a fresh [..., out] tensor; without a bias, `matmul` folds
    [..., in] into one `mm` and makes no view.
    """
    if bias is None:
        return torch.matmul(x, weight.T)  # [..., out]
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)  # [..., out]
    torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.T, out=y.view(-1, weight.shape[0]))
    return y


class FactorCache:
    """Per layer, one value derived from adapter factors (e.g. their stacked copies for a mixed batch),
    kept until a factor is replaced or changed in place. The entry holds the factors it was built from,
    so that no new tensor can take one of their ids while it is cached."""

    def __init__(self) -> None:
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, factors, value)

    def get(self, layer: object, factors: list[torch.Tensor], extra: tuple, build: Callable[[], object]) -> object:
        key = (*((id(t), t._version) for t in factors), *extra)
        entry = self.entries.get(layer)
        if entry is None or entry[0] != key:
            entry = (key, factors, build())
            self.entries[layer] = entry
        return entry[2]
