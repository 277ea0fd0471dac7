"""What a training step computes, against plain-torch references: bf16 autocast, gradient clipping,
gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.adapters.layer import lora_layers
from lorakit.config import TrainConfig
from lorakit.data.encode import collate
from lorakit.quant.linear4bit import quantize_model
from lorakit.train import fit as fit_module
from lorakit.train.fit import fit, trainable
from lorakit.train.loop import loss_sum
from lorakit.train.run import prepare_base
from test_accumulation import adapter_model, capture_gradients, ragged_rows

BF16_LOSS_TOLERANCE = 4e-3  # relative: one bf16 rounding (8 significant bits, 2^-8); measured 3e-4 here


def output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Record, as the model runs, the dtype of every adapted linear's output (base matmul + adapter) and
    of its base matmul alone (the frozen nn.Linear inside the wrapper)."""
    seen = []
    for _, layer in lora_layers(model):
        for module in (layer, layer.base_module):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_adapters(monkeypatch, precision):
    rows = ragged_rows(8)
    model = adapter_model()
    reference = copy.deepcopy(model)
    seen = capture_gradients(monkeypatch)
    dtypes = output_dtypes(model)
    cfg = dict(max_steps=1, batch_size=4, grad_accum=2, warmup_steps=1, lr=1e-3, max_grad_norm=1e9)
    got = fit(model, rows, TrainConfig(**cfg, precision=precision), pad_id=1, log=lambda *_: None)
    want = fit(reference, rows, TrainConfig(**cfg), pad_id=1, log=lambda *_: None)  # fp32

    want_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert len(dtypes) == 2 * 2 * len(list(lora_layers(model))) and set(dtypes) == {want_dtype}  # 2 micro-batches
    assert all(p.dtype == torch.float32 for p in trainable(model).values())  # the adapter stays fp32
    assert all(g.dtype == torch.float32 for g in seen[0]["grads"])
    loss, fp32_loss = got.history[0]["loss"], want.history[0]["loss"]
    if precision == "fp32":
        assert loss == fp32_loss
        return
    assert loss != fp32_loss and abs(loss - fp32_loss) <= BF16_LOSS_TOLERANCE * fp32_loss
    for bf16, fp32 in zip(seen[0]["grads"], seen[1]["grads"], strict=True):  # the step's direction holds too
        assert float((bf16 - fp32).norm()) <= 0.1 * float(fp32.norm())  # measured: at most 0.036


def sgd(name, params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr)


@pytest.mark.parametrize("max_norm", [1e-3, 1e9])
def test_clipping_scales_the_update_by_max_norm_over_the_total_norm(monkeypatch, max_norm):
    """SGD (lr 1): the applied update is -g x min(1, max_norm / ||g||), ||g|| over all adapter gradients
    together (plain torch, float64); the reported grad_norm is the norm before clipping."""
    monkeypatch.setattr(fit_module, "make_optimizer", sgd)
    seen = capture_gradients(monkeypatch)
    model = adapter_model()
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=1, lr=1.0, schedule="constant", max_grad_norm=max_norm)
    result = fit(model, ragged_rows(8), cfg, pad_id=1, log=lambda *_: None)

    grads = dict(zip(before, seen[0]["grads"], strict=True))
    total = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())))
    assert total > 100 * 1e-3  # small max_norm really clips
    scale = min(1.0, max_norm / total)
    assert result.history[0]["grad_norm"] == pytest.approx(total, rel=1e-6, abs=1e-6)
    update_norm = 0.0
    for name, p in trainable(model).items():  # within a few fp32 ulps of the parameter (|p| < 1)
        torch.testing.assert_close(p.detach(), before[name] - scale * grads[name], rtol=0, atol=2e-7, msg=name)
        update_norm += float((p.detach() - before[name]).double().pow(2).sum())
    assert update_norm**0.5 == pytest.approx(min(max_norm, total), rel=1e-3)
    assert max(float(p.abs().max()) for p in before.values()) < 1


def forward_calls(model: torch.nn.Module) -> list[int]:
    """Count the forward calls of each decoder layer's MLP (inside a checkpointed layer: it runs again in
    backward; transformers checkpoints the layer's forward, so hooks on the layer itself run once)."""
    calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_gradients_equal_with_and_without_gradient_checkpointing(quant):
    """The trainer's checkpointing (`gradient_checkpointing: true`, as `prepare_base` sets it up) recomputes
    each block in backward and gives the same gradients, within fp32 rounding (dropout 0)."""
    base = quantize_model(tiny_llama(), blocksize=32) if quant else tiny_llama()
    plain = lorakit.inject(base, lorakit.LoraSpec(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    randomize_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    prepare_base(checkpointed, TrainConfig(gradient_checkpointing=True))
    batch = collate(ragged_rows(8), pad_id=1)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        calls = forward_calls(model)
        loss_sum(model, batch).backward()
        grads.append({n: p.grad for n, p in trainable(model).items()})
        assert len(calls) == len(model.model.layers) * (2 if model is checkpointed else 1)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)
