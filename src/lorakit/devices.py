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
