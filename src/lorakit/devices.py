"""Which device a command runs on: `auto`, `cpu`, `cuda`, `cuda:N` (or a `torch.device`).

A leaf: the loader, the training loop and the CLI all resolve a device name here, so the error for
a device that does not exist reads the same everywhere.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def available_devices() -> list[str]:
    """The devices this process can use, as names a user can pass."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`name` as a concrete torch.device; `auto` is cuda when available, else cpu.

    Raises ValueError naming the device and what is available when it does not exist here.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {name!r} is not supported: use one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} is not available: no CUDA device here (available: "
                         f"{', '.join(available_devices())})")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist (available: {', '.join(available_devices())})")
    return torch.device("cuda", index)


def check_device_name(name: str) -> str:
    """`name` if it has the form of a device (`auto`, `cpu`, `cuda`, `cuda:N`), else a ValueError.

    Config files are checked with this alone, so a config written for a GPU machine can be read (and
    printed) anywhere; whether the device exists is `resolve_device`'s question, asked before a model loads.
    """
    if isinstance(name, str) and (name in ("auto", "cpu", "cuda") or
                                  (name.startswith("cuda:") and name[5:].isdigit())):
        return name
    raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`fp32` or `bf16` for a run on `device`: `auto` is bf16 autocast on a CUDA device that supports bf16,
    fp32 everywhere else (bf16 matmuls are slower than fp32 on most CPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory torch has held on CUDA `device` so far, in MiB; None elsewhere (no such counter)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (its first parameter's device): where its inputs must be made."""
    return next(model.parameters()).device


def device_metrics(device: torch.device) -> dict[str, float]:
    """Per-step device metrics for metrics.jsonl: {"peak_device_mb": ...} on CUDA, nothing on the CPU."""
    peak = peak_memory_mb(device)
    return {} if peak is None else {"peak_device_mb": peak}
