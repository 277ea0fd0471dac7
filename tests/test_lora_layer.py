"""The LoRA layer against the formula written out in plain torch; merge, unmerge, unload."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.adapters.layer import LoraLayer, lora_layers


def one_layer_model(base: nn.Module) -> nn.Module:
    return nn.Sequential(base)


def random_factors(layer: LoraLayer, name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter = layer.adapters[name]
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g))
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g))
    return adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_is_the_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model = lorakit.inject(one_layer_model(base), lorakit.LoraSpec(r=3, alpha=5, targets=["0"], rslora=rslora))
    layer = model[0]
    a, bb = random_factors(layer, "default")
    x = torch.randn(4, 6, 12)
    scale = 5 / math.sqrt(3) if rslora else 5 / 3
    expected = x @ w.T + b + scale * ((x @ a.T) @ bb.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_forward_is_the_formula():
    torch.manual_seed(0)
    base = Conv1D(9, 12)  # nf=9 out, nx=12 in; weight [12, 9]
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model = lorakit.inject(one_layer_model(base), lorakit.LoraSpec(r=4, alpha=8, targets=["0"]))
    a, bb = random_factors(model[0], "default")
    assert a.shape == (4, 12) and bb.shape == (9, 4)
    x = torch.randn(3, 5, 12)
    expected = x @ w + b + 2.0 * ((x @ a.T) @ bb.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    w = base.weight.detach().clone()
    model = lorakit.inject(one_layer_model(base), lorakit.LoraSpec(r=2, alpha=4, targets=["0"]))
    layer = model[0]
    # PEFT's embedding init: A is zero, B random, so the fresh adapter changes nothing
    assert torch.count_nonzero(layer.adapters["default"].lora_A) == 0
    a, bb = random_factors(layer, "default")
    ids = torch.tensor([[0, 5, 19], [3, 3, 7]])
    expected = w[ids] + 2.0 * (a.T[ids] @ bb.T)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_leaves_model_unchanged_and_inits_as_specified(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    lorakit.inject(model, lorakit.LoraSpec(r=4, init="gaussian"))
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)
    for _, layer in lora_layers(model):
        adapter = layer.adapters["default"]
        assert torch.count_nonzero(adapter.lora_B) == 0
        # gaussian init: std 1/r; with 4 x (32 or 48) draws the sample std is within 30%
        assert 0.7 / 4 < adapter.lora_A.std().item() < 1.3 / 4


def test_kaiming_init_bound():
    model = lorakit.inject(nn.Sequential(nn.Linear(64, 8)), lorakit.LoraSpec(r=16, targets=["0"]))
    a = model[0].adapters["default"].lora_A
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    model = lorakit.inject(nn.Sequential(nn.Linear(8, 8)), lorakit.LoraSpec(r=2, dropout=0.5, targets=["0"]))
    layer = model[0]
    random_factors(layer, "default")
    x = torch.randn(2, 8)
    model.train()
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    mask_x = F.dropout(x, 0.5, training=True)
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    expected = F.linear(x, layer.weight, layer.bias) + (mask_x @ a.T @ b.T) * 8.0  # alpha 16 / r 2
    torch.testing.assert_close(y, expected)


def test_base_keeps_its_names_and_only_adapter_keys_are_added():
    model = tiny_llama()
    base_keys = set(model.state_dict())
    lorakit.inject(model, lorakit.LoraSpec(r=2))
    keys = set(model.state_dict())
    assert base_keys <= keys
    added = keys - base_keys
    assert added and all(".adapters.default.lora_" in k for k in added)
    # a base checkpoint loads unchanged into the injected model
    missing, unexpected = model.load_state_dict(tiny_llama(seed=3).state_dict(), strict=False)
    assert not unexpected and set(missing) == added


def test_only_adapter_parameters_train():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)


def test_several_adapters_sum_and_any_subset_is_active(tokens):
    model = tiny_llama()
    base = model(tokens).logits
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj", "v_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraSpec(r=3, targets=["v_proj", "down_proj"]), name="b")
    randomize_adapters(model)
    outputs = {}
    for active in ([], ["a"], ["b"], ["a", "b"]):
        lorakit.set_active(model, active)
        outputs[tuple(active)] = model(tokens).logits
    torch.testing.assert_close(outputs[()], base)
    assert not torch.allclose(outputs[("a",)], base)
    # the layer outputs add: check on one v_proj layer directly
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(5, 32)
    lorakit.set_active(model, ["a", "b"])
    both = layer(x) - F.linear(x, layer.weight)
    expected = layer.adapters["a"](x) + layer.adapters["b"](x)
    torch.testing.assert_close(both, expected)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        lorakit.set_active(model, ["c"])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_restores_and_merged_logits_agree(make, tokens):
    model = make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    spec = lorakit.LoraSpec(r=4, alpha=8, targets="all-linear")
    lorakit.inject(model, spec)
    randomize_adapters(model)
    unmerged = model(tokens).logits
    lorakit.merge(model)
    merged = model(tokens).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    changed = [k for k in original if not torch.equal(model.state_dict()[k], original[k])]
    assert changed, "merging must change base weights"
    lorakit.unmerge(model)
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_plain_modules(tokens):
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraSpec(r=4, targets=["c_attn", "c_fc"], modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.lora_copies.copies["default"].weight.mul_(1.5)
    expected = model(tokens).logits
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    assert not hasattr(plain.lm_head, "lora_copies")
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(".adapters." not in k and "lora_copies" not in k for k in plain.state_dict())


def test_safe_merge_refuses_non_finite_and_names_adapter():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2, targets=["q_proj"]), name="bad")
    layer = model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["bad"].lora_B.fill_(float("inf"))
        layer.adapters["bad"].lora_A.fill_(1.0)
    before = layer.weight.clone()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: merging adapter 'bad'"):
        lorakit.merge(model, safe=True)
    assert torch.equal(layer.weight, before)


def test_merge_weights_pure_function_equals_model_merge():
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=7, targets=["c_attn", "c_proj"], rslora=True))
    randomize_adapters(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    adapter, scales, transposed = {}, {}, set()
    for path, layer in lora_layers(model):
        a = layer.adapters["default"]
        adapter[f"{path}.lora_A"], adapter[f"{path}.lora_B"] = a.lora_A.detach(), a.lora_B.detach()
        scales[path] = 7 / math.sqrt(3)
        transposed.add(path)
    merged_sd = lorakit.merge_weights(base, adapter, scales, transposed)
    lorakit.merge(model)
    for key, value in merged_sd.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_merge_weights_refuses_adalora_tensors():
    base = {"m.weight": torch.zeros(3, 4)}
    adapter = {"m.lora_A": torch.ones(2, 4), "m.lora_B": torch.ones(3, 2), "m.lora_E": torch.ones(2, 1)}
    with pytest.raises(ValueError, match="AdaLoRA adapter"):
        lorakit.merge_weights(base, adapter, {"m": 1.0})
