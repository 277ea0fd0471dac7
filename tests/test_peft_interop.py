"""PEFT reads what lorakit writes and lorakit reads what PEFT writes, with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

CASES = [
    # (model, lorakit spec, the same as a PEFT LoraConfig)
    (tiny_llama, dict(r=4, alpha=8, targets="all-linear"), dict(r=4, lora_alpha=8, target_modules="all-linear")),
    (tiny_llama,
     dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"], rslora=True,
          rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, modules_to_save=["lm_head"]),
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True,
          rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, modules_to_save=["lm_head"])),
    (tiny_gpt2, dict(r=4, alpha=16, targets=["c_attn", "c_proj"], bias="lora_only"),
     dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], bias="lora_only", fan_in_fan_out=True)),
    (tiny_gpt2, dict(r=2, alpha=4, targets=None, bias="all", rank_pattern={"h.1.attn.c_attn": 5}),
     dict(r=2, lora_alpha=4, target_modules=None, bias="all", rank_pattern={"h.1.attn.c_attn": 5},
          fan_in_fan_out=True)),
    (tiny_gpt2, dict(r=3, alpha=6, targets="all-linear", modules_to_save=["wte"]),
     dict(r=3, lora_alpha=6, target_modules="all-linear", modules_to_save=["wte"], fan_in_fan_out=True)),
]
IDS = ["llama-all-linear", "llama-patterns-rslora-embed-mts", "gpt2-bias-lora-only", "gpt2-default-bias-all",
       "gpt2-all-linear-mts"]


def perturb_trainable_extras(model, seed: int = 2) -> None:
    """Non-adapter trainable tensors (biases, module copies) move away from the base values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(("make", "spec", "config"), CASES, ids=IDS)
def test_lorakit_adapter_loads_in_peft(make, spec, config, tmp_path, tokens):
    model = lorakit.inject(make(), lorakit.LoraSpec(**spec))
    randomize_adapters(model)
    perturb_trainable_extras(model)
    expected = model(tokens).logits
    lorakit.save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert all(k.startswith("base_model.model.") for k in f.keys())  # noqa: SIM118
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("make", "spec", "config"), CASES, ids=IDS)
def test_peft_adapter_loads_in_lorakit(make, spec, config, tmp_path, tokens):
    peft_model = get_peft_model(make(), LoraConfig(**config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    perturb_trainable_extras(peft_model)
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    model = make()
    name = lorakit.load_adapter(model, tmp_path)
    assert name == "default"
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    # and a round trip through lorakit's writer reproduces PEFT's tensors exactly
    lorakit.save_adapter(model, tmp_path / "again")
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "again" / "adapter_model.safetensors", framework="pt") as b:
        # PEFT also stores an embedding's unchanged base weight beside its adapter; we do not
        assert set(b.keys()) == {k for k in a.keys() if not k.endswith(".base_layer.weight")}  # noqa: SIM118
        for key in b.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


@pytest.mark.parametrize(("make", "spec", "config"), CASES, ids=IDS)
def test_trainable_report_matches_peft(make, spec, config, capsys):
    model = lorakit.inject(make(), lorakit.LoraSpec(**spec))
    get_peft_model(make(), LoraConfig(**config)).print_trainable_parameters()
    assert lorakit.trainable_report(model) == capsys.readouterr().out.strip()


def test_saved_config_is_peft_config(tmp_path):
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraSpec(r=4, alpha=8, targets=["c_attn"], rslora=True))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert config["target_modules"] == ["c_attn"] and loaded.target_modules == {"c_attn"}
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora, loaded.fan_in_fan_out) == (4, 8, True, True)
    assert loaded.peft_type.value == "LORA" and loaded.task_type == "CAUSAL_LM"


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    lorakit.save_adapter(model, tmp_path)
    frozen = tiny_llama()
    lorakit.load_adapter(frozen, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = tiny_llama()
    lorakit.load_adapter(trainable, tmp_path, trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".adapters.default.lora_" in n for n in names)
