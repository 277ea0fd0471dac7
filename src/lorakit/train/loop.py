"""The training loss: next-token cross entropy summed over supervised positions.

The loop itself (optimizer, schedule, accumulation, checkpoints) is in `fit.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.encode import IGNORE
from lorakit.kernels.linear_ce import linear_cross_entropy

# model types whose logits are exactly lm_head(last hidden state): the head runs only where loss is taken
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo2"}


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over supervised positions.

    For plain-head model types the head runs only at supervised positions, chunk by chunk, so the
    [tokens, vocab] logits never exist (see `lorakit.kernels.linear_ce`).
    """
    labels = batch["labels"][:, 1:]  # [b, t-1]: position i predicts token i+1
    keep = labels != IGNORE
    head = plain_head(model)
    if head is not None:
        hidden = model.base_model(**model_inputs(batch), use_cache=False)[0]  # no KV cache in training
        return head_loss_sum(hidden[:, :-1][keep], labels[keep], head)
    out = model(**model_inputs(batch), use_cache=False)
    return F.cross_entropy(out.logits[:, :-1][keep].float(), labels[keep], reduction="sum")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (where the trained parameters are); unchanged when already there."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model takes from a batch: ids, mask (2-D, or 4-D for packed rows), position ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output head when logits are exactly head(last hidden state), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if is_sharded(model):  # FSDP2: only the root's forward gathers the head's weight
        return None
    return head if model_type in PLAIN_HEAD_TYPES and head is not None else None


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards `model` (`train.distributed.shard`): only a call of the whole model then gathers
    its root's parameters (embeddings, head)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def head_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Summed cross entropy of head(hidden) [tokens, vocab] against labels [tokens], in fp32.

    A bare nn.Linear head takes the chunked path; a wrapped or routed one (LoRA on the head, a
    modules_to_save copy, hooks) is called as a module.
    """
    if type(head) is nn.Linear and "forward" not in vars(head) and not head._forward_hooks \
            and not head._forward_pre_hooks:
        return linear_cross_entropy(hidden, head.weight, labels, head.bias)
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")
