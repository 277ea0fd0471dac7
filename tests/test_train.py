"""The training loop on tiny models: it learns, accumulation is exact, the schedule is as stated."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import tiny_llama
from lorakit.config import TrainConfig
from lorakit.data.encode import IGNORE, collate
from lorakit.train.fit import fit, lr_lambda
from lorakit.train.loop import loss_sum


def toy_rows(n: int = 16, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Prompt of 6 random ids, answer = the prompt reversed: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 128, (6,), generator=g).tolist()
        answer = prompt[::-1] + [1]
        rows.append((prompt + answer, [IGNORE] * 6 + answer))
    return rows


def test_loss_sum_equals_full_logits_cross_entropy():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    batch = collate(toy_rows(4), pad_id=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss_sum(model, batch), expected, rtol=1e-5, atol=1e-4)


def test_fit_lowers_loss_and_writes_metrics(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=8, alpha=16))
    cfg = TrainConfig(max_steps=40, lr=1e-2, warmup_steps=2, batch_size=8, seed=0)
    result = fit(model, toy_rows(), cfg, pad_id=1, out=tmp_path)
    assert result.steps == 40 and result.last_loss < 0.6 * result.first_loss
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_rss_mb", "seconds"} <= set(records[0])
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[0]["loss"] == pytest.approx(result.first_loss)


def test_gradient_accumulation_equals_one_large_batch(monkeypatch):
    # SGD in place of AdamW: the update is linear in the gradient, so equal updates mean equal gradients
    # (Adam's first step is about lr * sign(g), which amplifies rounding noise in near-zero entries)
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay, **_: torch.optim.SGD(params, lr=lr))
    rows = toy_rows(8)
    base = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4))
    with torch.no_grad():  # non-zero B so A receives gradient too
        for p in base.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    big, small = copy.deepcopy(base), copy.deepcopy(base)
    # one step over 8 rows at once vs 4 micro-batches of 2 (same shuffle: one epoch of 8 rows)
    fit(big, rows, TrainConfig(max_steps=1, batch_size=8, grad_accum=1, warmup_steps=1, lr=1.0), pad_id=1)
    fit(small, rows, TrainConfig(max_steps=1, batch_size=2, grad_accum=4, warmup_steps=1, lr=1.0), pad_id=1)
    moved = False
    for (name, a), (_, b), (_, c) in zip(big.named_parameters(), small.named_parameters(), base.named_parameters(),
                                         strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(a, c)
    assert moved


def test_schedule_warmup_then_cosine_to_zero():
    f = lr_lambda(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.0, abs=1e-12)


def test_fit_refuses_a_model_with_nothing_to_train():
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(tiny_llama().requires_grad_(False), toy_rows(), TrainConfig(max_steps=1), pad_id=1)


def test_epochs_bound_the_run_when_max_steps_is_unset():
    from lorakit.train.fit import total_steps

    assert total_steps(TrainConfig(max_steps=None, epochs=2, batch_size=4, grad_accum=2), n_rows=20) == 5
    assert total_steps(TrainConfig(max_steps=None, epochs=0.5, batch_size=4), n_rows=20) == 3
    assert total_steps(TrainConfig(max_steps=7, epochs=2), n_rows=20) == 7
    with pytest.raises(ValueError, match="set max_steps or epochs"):
        total_steps(TrainConfig(max_steps=None, epochs=None), n_rows=20)


@pytest.mark.slow  # compiling takes tens of seconds on the CPU, even for a tiny model
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    from conftest import randomize_adapters
    from lorakit.train.run import compile_blocks

    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def loss_and_grads():
        loss = loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager = loss_and_grads()
    assert compile_blocks(model) == model.config.num_hidden_layers
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert grads.keys() == eager.keys()
    for name, grad in grads.items():
        assert (grad - eager[name]).norm() <= 1e-5 * eager[name].norm(), name


def test_compile_refuses_a_model_without_named_blocks():
    from lorakit.train.run import compile_blocks

    with pytest.raises(ValueError, match="_no_split_modules"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("quant", [[], ["quant={}"]], ids=["lora", "qlora"])
def test_training_over_a_bf16_checkpoint_keeps_it_bf16_and_learns(quant, jsonl, tmp_path):
    """dtype: auto (the default) stores a bf16 checkpoint's weights in bf16; the adapter stays fp32 (as PEFT
    keeps it), reads the bf16 activations cast to fp32 and adds its delta back in bf16; QLoRA quantizes the
    bf16 weights (computing in fp32) and keeps the norms and head bf16. A few steps lower the loss."""
    from conftest import tiny_tokenizer
    from lorakit.adapters.layer import lora_layers
    from lorakit.config import load_train_config
    from lorakit.quant.linear4bit import Linear4bit
    from lorakit.train.run import run

    folder = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = load_train_config(None, [f"base={folder}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}",
                                   "max_steps=12", "lr=0.02", "warmup_steps=1", "eval=false", *quant])
    assert cfg.dtype == "auto"
    model, results = run(cfg, log=lambda *_: None)
    assert results["last_loss"] < 0.7 * results["first_loss"]
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    layers = [layer for _, layer in lora_layers(model)]
    assert layers and all(p.dtype == torch.float32 for layer in layers for a in layer.adapters.values()
                          for p in a.parameters())
    base = layers[0].base_module
    assert model.model.norm.weight.dtype == torch.bfloat16
    if quant:
        assert isinstance(base, Linear4bit) and base.quant_state.dtype == torch.bfloat16
    else:
        assert base.weight.dtype == torch.bfloat16
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118


def test_train_config_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        TrainConfig(dtype="fp8")
