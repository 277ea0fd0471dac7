"""QLoRA with the 8-bit optimizer, resumed through the trainer: N steps straight and N/2 steps, a
checkpoint, then N/2 more in a fresh model and optimizer end with the same adapter and the same
optimizer state, bit for bit on the CPU (LoRA dropout on, so the RNG state must resume too)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapters.io import save_adapter
from lorakit.config import QuantConfig, TrainConfig
from lorakit.quant.linear4bit import quantize_model
from lorakit.train.fit import STATE_FILE, fit, trainable
from lorakit.train.run import prepare_base
from test_accumulation import ragged_rows

N = 4


def qlora_model(init_seed: int) -> torch.nn.Module:
    """A 4-bit Llama (NF4, double quantization) prepared as the trainer prepares it, with an adapter wide
    enough that some of its tensors (4096 values) get 8-bit moments; `init_seed` draws the adapter."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    quantize_model(model)  # NF4 + double quantization, as models.load(quant=...) makes it
    prepare_base(model, TrainConfig(quant=QuantConfig()))  # checkpointing, as the trainer prepares it
    torch.manual_seed(init_seed)
    return lorakit.inject(model, lorakit.LoraSpec(r=16, alpha=32, dropout=0.1, targets="all-linear"))


def config(**extra) -> TrainConfig:
    return TrainConfig(max_steps=N, batch_size=2, lr=1e-2, warmup_steps=2, optim="adamw8bit", checkpoint_every=N // 2,
                       quant=QuantConfig(), **extra)


def run(model: torch.nn.Module, out, **extra) -> None:
    out.mkdir()
    fit(model, ragged_rows(8), config(**extra), pad_id=1, out=out, save_adapter=lambda p: save_adapter(model, p),
        log=lambda *_: None)


def assert_same(a, b, where: str) -> None:
    """Equal structure, and every tensor equal in dtype, shape and bits."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_qlora_8bit_optimizer_resume_equals_a_straight_run_bitwise(tmp_path):
    straight = qlora_model(init_seed=1)
    run(straight, tmp_path / "straight")

    fresh = qlora_model(init_seed=2)  # another initial adapter: the checkpoint must replace it
    assert not all(torch.equal(p, q) for p, q in zip(trainable(fresh).values(), trainable(straight).values(),
                                                     strict=True))
    run(fresh, tmp_path / "resumed", resume=str(tmp_path / "straight" / f"checkpoint-{N // 2}"))

    want = torch.load(tmp_path / "straight" / f"checkpoint-{N}" / STATE_FILE, weights_only=True)
    got = torch.load(tmp_path / "resumed" / f"checkpoint-{N}" / STATE_FILE, weights_only=True)
    assert want["step"] == got["step"] == N
    moments = [s for s in want["optimizer"]["state"].values()]
    assert any("exp_avg_q" in s for s in moments) and any("exp_avg" in s for s in moments)  # 8-bit and fp32 both
    assert_same(got["params"], want["params"], "params")
    assert_same(got["optimizer"], want["optimizer"], "optimizer")
    assert_same(got["schedule"], want["schedule"], "schedule")
    assert_same(got["torch_rng"], want["torch_rng"], "torch_rng")
    for name, p in trainable(straight).items():
        assert torch.equal(trainable(fresh)[name], p), name
    start = qlora_model(init_seed=1)
    assert any(not torch.equal(trainable(start)[n], p) for n, p in trainable(straight).items())  # it trained
    adapter = "adapter/adapter_model.safetensors"
    a = load_file(tmp_path / "straight" / f"checkpoint-{N}" / adapter)
    b = load_file(tmp_path / "resumed" / f"checkpoint-{N}" / adapter)
    assert_same(b, a, "adapter")


def test_cli_resume_with_the_8bit_optimizer_in_a_fresh_process(tiny_model_dir, jsonl, tmp_path):
    """`lorakit train quant={} optim=adamw8bit`: a new process resuming from the checkpoint at N/2 ends with
    the adapter of the run never stopped, bit for bit (it crashed on loading the 8-bit optimizer's state)."""
    from lorakit.cli import main

    common = [f"base={tiny_model_dir}", f"dataset={jsonl}", "quant={}", "optim=adamw8bit", f"max_steps={N}",
              f"checkpoint_every={N // 2}", "batch_size=2", "lr=0.01", "lora.dropout=0.1", "eval=false"]
    assert main(["train", *common, f"output_dir={tmp_path / 'straight'}"]) == 0
    resume = f"resume={tmp_path / 'straight' / f'checkpoint-{N // 2}'}"
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", *common, resume,
                           f"output_dir={tmp_path / 'resumed'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "resumed" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(N // 2 + 1, N + 1))  # it did resume
