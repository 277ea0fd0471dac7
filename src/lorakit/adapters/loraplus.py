"""LoRA+ (Hayou et al. 2024): optimizer parameter groups in which B learns `ratio` times faster than A.

The groups follow PEFT's `create_loraplus_optimizer`, decided by the wrappers rather than by names:
  A           every adapter's lora_A, and other trainable matrices (module copies)     lr
  B           every adapter's lora_B and its other vectors (DoRA's magnitude)          lr * ratio
  B_no_decay  other trainable vectors (biases, norm weights), no weight decay          lr * ratio
  embedding   both factors of an embedding's adapter (not its DoRA magnitude: B)       embedding_lr
"""

from __future__ import annotations

from torch import nn

from lorakit.adapters.layer import lora_layers
from lorakit.adapters.params import param_layers

DEFAULT_EMBEDDING_LR = 1e-6  # PEFT's and the LoRA+ reference code's `loraplus_lr_embedding`


def loraplus_roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> "A" | "B" | "embedding" for every adapter parameter of every wrapped layer."""
    roles = {}
    for _, layer in param_layers(model):  # expert adapters: ParamAdapter factors
        for adapter in layer.adapters.values():
            for p in adapter.values():
                roles[id(p.lora_A)], roles[id(p.lora_B)] = "A", "B"
    for _, layer in lora_layers(model):
        for adapter in layer.adapters.values():
            for name, p in adapter.named_parameters():
                if adapter.embedding and name in ("lora_A", "lora_B"):
                    roles[id(p)] = "embedding"
                else:
                    roles[id(p)] = "A" if name == "lora_A" else "B"
    return roles


def loraplus_param_groups(
    model: nn.Module, lr: float, ratio: float, embedding_lr: float | None = None, weight_decay: float = 0.0,
) -> list[dict]:
    """The trainable parameters of `model` as LoRA+ groups (non-empty ones only), each a dict with
    `params`, `lr`, `weight_decay` and `name`, for any torch optimizer."""
    if ratio <= 0:
        raise ValueError(f"loraplus ratio must be positive, got {ratio!r}")
    roles = loraplus_roles(model)
    settings = {
        "A": (lr, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
        "embedding": (DEFAULT_EMBEDDING_LR if embedding_lr is None else embedding_lr, weight_decay),
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for p in model.parameters():
        if p.requires_grad:
            members[roles.get(id(p)) or ("B_no_decay" if p.ndim == 1 else "A")].append(p)
    return [{"params": members[name], "lr": group_lr, "weight_decay": decay, "name": name}
            for name, (group_lr, decay) in settings.items() if members[name]]
