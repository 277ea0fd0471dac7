"""The training loop: AdamW on the adapter, linear warmup + cosine decay, gradient accumulation.

One optimizer step sees `batch_size * grad_accum` rows. The loss is the mean over every
supervised token of the whole step (not a mean of micro-batch means), so accumulating gives
the same update as one large batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.config import TrainConfig
from lorakit.data.encode import IGNORE, collate
from lorakit.kernels.linear_ce import linear_cross_entropy
from lorakit.quant.optim import make_optimizer

# model types whose logits are exactly lm_head(last hidden state): the head runs only where loss is taken
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo2"}


@dataclass
class FitResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def lr_lambda(warmup: int, total: int):
    """Multiplier of the peak lr: linear from 1/warmup up to 1, then cosine down to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross entropy over supervised positions.

    For plain-head model types the head runs only at supervised positions, chunk by chunk, so the
    [tokens, vocab] logits never exist (see `lorakit.kernels.linear_ce`).
    """
    labels = batch["labels"][:, 1:]  # [b, t-1]: position i predicts token i+1
    keep = labels != IGNORE
    head = plain_head(model)
    if head is not None:
        hidden = model.base_model(**model_inputs(batch))[0]
        return head_loss_sum(hidden[:, :-1][keep], labels[keep], head)
    out = model(**model_inputs(batch))
    return F.cross_entropy(out.logits[:, :-1][keep].float(), labels[keep], reduction="sum")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model takes from a batch: ids, mask (2-D, or 4-D for packed rows), position ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output head when logits are exactly head(last hidden state), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if model_type in PLAIN_HEAD_TYPES and head is not None else None


def head_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Summed cross entropy of head(hidden) [tokens, vocab] against labels [tokens], in fp32.

    A bare nn.Linear head takes the chunked path; a wrapped or routed one (LoRA on the head, a
    modules_to_save copy, hooks) is called as a module.
    """
    if type(head) is nn.Linear and "forward" not in vars(head) and not head._forward_hooks \
            and not head._forward_pre_hooks:
        return linear_cross_entropy(hidden, head.weight, labels, head.bias)
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None:
        raise ValueError("set max_steps or epochs")
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum)))


def batches(rows: list, cfg: TrainConfig, pad_id: int):
    """Endless micro-batches, reshuffled each epoch from the seed."""
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        size = min(cfg.batch_size, len(rows))  # the last partial batch of an epoch is dropped
        for i in range(0, len(order) - size + 1, size):
            yield collate([rows[j] for j in order[i : i + size]], pad_id)
        epoch += 1


def fit(model: nn.Module, rows: list[tuple[list[int], list[int]]], cfg: TrainConfig, pad_id: int,
        metrics_path: Path | None = None) -> FitResult:
    """Train the model's trainable parameters on encoded rows; log each step to `metrics_path`."""
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (inject an adapter first)")
    optimizer = make_optimizer(cfg.optim, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = total_steps(cfg, len(rows))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps))
    stream = batches(rows, cfg, pad_id)
    log = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 (closed below)
    model.train()
    start, first, loss_value = time.perf_counter(), None, float("nan")
    bar = tqdm(range(steps), desc="train", dynamic_ncols=True)
    try:
        for step in bar:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            total = 0.0
            for b in micro:
                loss = loss_sum(model, b) / max(1, n_tokens)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = total
            first = loss_value if first is None else first
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if log and (step % cfg.log_every == 0 or step == steps - 1):
                record = {"step": step + 1, "loss": loss_value, "lr": schedule.get_last_lr()[0],
                          "tokens": n_tokens, "seconds": round(time.perf_counter() - start, 3)}
                log.write(json.dumps(record) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
        model.eval()
    return FitResult(steps, first, loss_value, time.perf_counter() - start)
