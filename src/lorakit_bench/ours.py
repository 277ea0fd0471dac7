"""lorakit's side of each scenario, and the two references every training table carries.

forward: the frozen base, no grad, full logits (what `model(ids)` costs): the unit of time.
floor:   the frozen base forward + backward to the input embeddings, LM head and loss only at the
         supervised positions, no adapters: what any LoRA step must at least cost.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.data.encode import IGNORE
from lorakit_bench.workload import Task, Workload, load_base, make_batch, supervised_tokens, weight_mib


def lora_spec(w: Workload):
    from lorakit.config import LoraSpec

    return LoraSpec(r=w.r, alpha=w.alpha, dropout=0.0, targets=w.targets)


def forward_task(model: nn.Module, batch: dict[str, torch.Tensor]) -> Task:
    """A no-grad forward of `model` on the batch."""

    def run() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return Task(run, keep=[model])


def base_forward(w: Workload) -> Task:
    model = load_base(w)
    return forward_task(model, make_batch(w, model.config.vocab_size))


def floor(w: Workload) -> Task:
    """Frozen forward + backward to the inputs; the head and loss at supervised positions, chunked."""
    from lorakit.train.loop import head_loss_sum
    from lorakit.train.run import compile_blocks

    model = load_base(w)
    if w.compile:
        compile_blocks(model)
    batch = make_batch(w, model.config.vocab_size)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    n = supervised_tokens(batch)
    head = model.get_output_embeddings()

    def run() -> dict[str, float]:
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False)[0]
        loss = head_loss_sum(hidden[:, :-1][keep], labels[keep], head) / n
        loss.backward()
        return {"loss": loss.item()}

    return Task(run, keep=[model])


def lorakit_forward(w: Workload) -> Task:
    """A no-grad forward with an unmerged r-rank adapter on every target."""
    import lorakit

    model = load_base(w)
    lorakit.inject(model, lora_spec(w))
    task = forward_task(model.eval(), make_batch(w, model.config.vocab_size))
    task.reset = functools.partial(set_kernels, w.kernels)
    return task


def train_step_task(model: nn.Module, batch: dict[str, torch.Tensor], lr: float, loss_fn) -> Task:
    """One optimizer step per run: AdamW on the trainable parameters, grad-norm clipping at 1.0."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def run() -> dict[str, float]:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    return Task(run, keep=[model, optimizer], info=weight_mib(model))


def lorakit_train(w: Workload, quantized: bool = False) -> Task:
    """lorakit's LoRA (or, `quantized`, QLoRA: NF4 + double quantization) training step."""
    import lorakit
    from lorakit.config import QuantConfig, TrainConfig
    from lorakit.models import load_weights
    from lorakit.quant.linear4bit import quant_record
    from lorakit.train.loop import loss_sum
    from lorakit.train.run import prepare_base

    quant = QuantConfig(type="nf4", double_quant=True, blocksize=64, compute_dtype=w.dtype) if quantized else None
    model = load_weights(Path(w.model_dir), quant_record(quant), w.torch_dtype, torch.device("cpu"))
    model.requires_grad_(False)  # as `lorakit train`
    prepare_base(model, TrainConfig(quant=quant, gradient_checkpointing=w.checkpointing, compile=w.compile))
    lorakit.inject(model, lora_spec(w))
    model.train()
    batch = make_batch(w, model.config.vocab_size)
    n = supervised_tokens(batch)
    task = train_step_task(model, batch, w.lr, lambda: loss_sum(model, batch) / n)
    task.reset = functools.partial(set_kernels, w.kernels)
    return task


def lorakit_qlora_train(w: Workload) -> Task:
    return lorakit_train(w, quantized=True)


def set_kernels(on: bool) -> None:
    """lorakit's fast paths on (as shipped) or off (LORAKIT_KERNELS=0, the plain PyTorch paths). The
    switch is the environment, read on every call, so each lorakit task sets it before each of its
    runs (as its untimed reset)."""
    os.environ["LORAKIT_KERNELS"] = "1" if on else "0"


def randomize_lora_B(factors: list[torch.Tensor], seed: int) -> None:
    """Non-zero B factors (seeded), so that a merge changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in factors:
            b.copy_(torch.randn(b.shape, generator=g) * 0.01)


def lorakit_merge(w: Workload) -> Task:
    """merge_and_unload of an r-rank all-linear adapter; each run merges a fresh copy."""
    import lorakit
    from lorakit.adapters.layer import lora_layers

    base = load_base(w)
    state: dict[str, nn.Module] = {}

    def reset() -> None:
        state.clear()
        model = lorakit.inject(copy.deepcopy(base), lora_spec(w))
        randomize_lora_B([a.lora_B for _, layer in lora_layers(model) for a in layer.adapters.values()], w.seed)
        state["model"] = model

    def run() -> None:
        lorakit.merge_and_unload(state.pop("model"))

    return Task(run, reset, keep=[base])


def linear_weights(w: Workload) -> list[torch.Tensor]:
    """Every linear weight of the base model except the output head (what QLoRA quantizes)."""
    model = load_base(w)
    head = model.get_output_embeddings()
    return [m.weight.detach() for m in model.modules() if type(m) is nn.Linear and m is not head]


def lorakit_quant(w: Workload) -> Task:
    """NF4 (blocksize 64, double quantization) quantize, then dequantize, every linear weight."""
    from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

    weights = linear_weights(w)

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        packed = [quantize_4bit(t, "nf4", 64, True) for t in weights]
        t1 = time.perf_counter()
        for p, state in packed:
            dequantize_4bit(p, state, w.torch_dtype)
        return {"quantize_s": t1 - t0, "dequantize_s": time.perf_counter() - t1}

    return Task(run, keep=[weights])
