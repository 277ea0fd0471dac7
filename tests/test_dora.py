"""DoRA against its formula in plain torch, against PEFT (both ways), and merge/unmerge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit.adapters.dora import DoraAdapter, row_norm
from lorakit.adapters.layer import lora_layers
from lorakit.adapters.state import adapters_of
from lorakit.quant.linear4bit import Linear4bit, dequantize_weight, quantize_model


def randomize_dora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero factors and a magnitude away from its initial row norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.1)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
                if isinstance(adapter, DoraAdapter):
                    adapter.magnitude.mul_(1 + 0.2 * torch.randn(adapter.magnitude.shape, generator=g))


def dora_weight(w: torch.Tensor, a, b, m, scale: float, detach: bool = True) -> torch.Tensor:
    """The paper's W' = m * V / ||V||, V = W + s B A, norm per output row of [out, in]."""
    v = w + scale * b @ a
    norm = v.norm(dim=1, keepdim=True)
    return m[:, None] * v / (norm.detach() if detach else norm)


def one_dora_layer(base: nn.Module, **spec) -> tuple[nn.Module, DoraAdapter]:
    model = lorakit.inject(nn.Sequential(base), lorakit.LoraSpec(targets=["0"], kind="dora", **spec))
    randomize_dora(model)
    return model, model[0].adapters["default"]


def test_fresh_dora_leaves_output_unchanged_and_magnitude_is_row_norms(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    lorakit.inject(model, lorakit.LoraSpec(r=4, kind="dora"))
    torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.adapters["default"].magnitude, q.weight.norm(dim=1))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_and_gradients_are_the_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    w, bias = base.weight.detach().clone(), base.bias.detach().clone()
    model, dora = one_dora_layer(base, r=3, alpha=5, rslora=rslora)
    x = torch.randn(4, 6, 12, requires_grad=True)
    y = model(x)
    a, b, m = (t.detach().clone().requires_grad_() for t in (dora.lora_A, dora.lora_B, dora.magnitude))
    x_ref = x.detach().clone().requires_grad_()
    expected = x_ref @ dora_weight(w, a, b, m, dora.scale).T + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # backward: the norm is a constant (paper 4.3), so gradients match the detached reference ...
    g = torch.randn(y.shape)
    y.backward(g)
    expected.backward(g)
    for ours, ref in ((dora.lora_A, a), (dora.lora_B, b), (dora.magnitude, m), (x, x_ref)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)
    # ... and differ from those of the undetached norm
    a2 = a.detach().clone().requires_grad_()
    (x_ref.detach() @ dora_weight(w, a2, b.detach(), m.detach(), dora.scale, detach=False).T).backward(g)
    assert not torch.allclose(a2.grad, a.grad, rtol=1e-3, atol=1e-5)


def test_conv1d_forward_is_the_formula():
    torch.manual_seed(0)
    base = Conv1D(9, 12)  # weight [12 in, 9 out]
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    w, bias = base.weight.detach().T.clone(), base.bias.detach().clone()  # [out, in]
    model, dora = one_dora_layer(base, r=4, alpha=8)
    assert dora.magnitude.shape == (9,)
    x = torch.randn(3, 5, 12)
    expected = x @ dora_weight(w, dora.lora_A, dora.lora_B, dora.magnitude, 2.0).T + bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_4bit_base_forward_is_the_formula_and_unloads_to_it():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 24), blocksize=64)
    w = dequantize_weight(base, torch.float32)
    bias = base.bias.detach().clone()
    model, dora = one_dora_layer(base, r=4, alpha=8)
    x = torch.randn(3, 64)
    merged_w = dora_weight(w, dora.lora_A, dora.lora_B, dora.magnitude, 2.0).detach()
    torch.testing.assert_close(model(x), x @ merged_w.T + bias, rtol=1e-5, atol=1e-5)
    plain = lorakit.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain[0].weight, merged_w, rtol=1e-5, atol=1e-6)


def test_embedding_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    w = base.weight.detach().T.clone()  # [out = 6, in = 20]
    model, dora = one_dora_layer(base, r=2, alpha=4)
    ids = torch.tensor([[0, 5, 19], [3, 3, 7]])
    expected = dora_weight(w, dora.lora_A, dora.lora_B, dora.magnitude, 2.0).T[ids]
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_is_peft_formula():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    model, dora = one_dora_layer(base, r=2, alpha=4, dropout=0.5)
    x = torch.randn(3, 8)
    model.train()
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    w, a, b, m = base.weight, dora.lora_A, dora.lora_B, dora.magnitude
    ratio = m / (w + 2.0 * b @ a).norm(dim=1)
    expected = x @ w.T + base.bias + (ratio - 1) * (xd @ w.T) + ratio * 2.0 * (xd @ a.T @ b.T)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_factored_norm_equals_direct_norm():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(30, 20, generator=g), torch.randn(4, 20, generator=g), torch.randn(30, 4, generator=g)
    torch.testing.assert_close(row_norm(w, a, b, 0.7), (w + 0.7 * b @ a).norm(dim=1), rtol=1e-5, atol=1e-5)


def test_eval_norm_cache_follows_changes():
    model, dora = one_dora_layer(nn.Linear(8, 5), r=2)
    x = torch.randn(2, 8)
    model.train()
    model(x)
    assert dora.norm_cache is None  # in training the norm changes every step: computed, not kept
    model.eval()
    first = model(x)
    assert dora.norm_cache is not None
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    with torch.no_grad():
        dora.lora_B.mul_(3.0)  # an in-place change (an optimizer step, a load) invalidates the cache
    w = model[0].weight
    expected = x @ dora_weight(w, dora.lora_A, dora.lora_B, dora.magnitude, dora.scale).T + model[0].bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.train()  # ||W_i||^2 is kept across training steps (W is frozen) until W itself changes
    with torch.no_grad():
        w.mul_(0.5)
    expected = x @ dora_weight(w, dora.lora_A, dora.lora_B, dora.magnitude, dora.scale).T + model[0].bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_restores_and_merged_logits_agree(make, tokens):
    model = make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear", kind="dora"))
    randomize_dora(model)
    unmerged = model(tokens).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_dora_and_lora_together_merge_exactly_and_two_doras_are_refused(tokens):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj", "v_proj"]), name="plain")
    lorakit.inject(model, lorakit.LoraSpec(r=3, targets=["v_proj"], kind="dora"), name="dora")
    randomize_dora(model)
    lorakit.set_active(model, ["plain", "dora"])
    expected = model(tokens).logits
    lorakit.merge(model)  # DoRA goes first, so that the LoRA merge cannot change it
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["v_proj"], kind="dora"), name="dora2")
    lorakit.set_active(model, ["dora", "dora2"])
    with pytest.raises(ValueError, match="would change active adapter"):
        lorakit.merge(model)


CASES = [
    (tiny_llama, dict(r=4, alpha=8, targets="all-linear", kind="dora"),
     dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    (tiny_llama, dict(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], rslora=True,
                      rank_pattern={"v_proj": 2}, kind="dora"),
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True,
          rank_pattern={"v_proj": 2}, use_dora=True)),
    (tiny_gpt2, dict(r=4, alpha=16, targets=["c_attn", "c_proj", "wte"], bias="lora_only", kind="dora"),
     dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "wte"], bias="lora_only", fan_in_fan_out=True,
          use_dora=True)),
]
IDS = ["llama-all-linear", "llama-rslora-pattern-embedding", "gpt2-conv1d-embedding-bias"]


@pytest.mark.parametrize(("make", "spec", "config"), CASES, ids=IDS)
def test_lorakit_dora_loads_in_peft(make, spec, config, tmp_path, tokens):
    model = lorakit.inject(make(), lorakit.LoraSpec(**spec))
    randomize_dora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.05)
    expected = model(tokens).logits
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        magnitudes = [k for k in f.keys() if k.endswith(".lora_magnitude_vector")]  # noqa: SIM118
        assert magnitudes and all(f.get_tensor(k).ndim == 1 for k in magnitudes)
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("make", "spec", "config"), CASES, ids=IDS)
def test_peft_dora_loads_in_lorakit(make, spec, config, tmp_path, tokens):
    peft_model = get_peft_model(make(), LoraConfig(**config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.requires_grad:
                p.add_(0.05)
    peft_model.eval()
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    model = make()
    lorakit.load_adapter(model, tmp_path)
    assert adapters_of(model).specs["default"].kind == "dora"
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    lorakit.save_adapter(model, tmp_path / "again")
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "again" / "adapter_model.safetensors", framework="pt") as b:
        assert set(b.keys()) == {k for k in a.keys() if not k.endswith(".base_layer.weight")}  # noqa: SIM118
        for key in b.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_dora_trained_on_4bit_loads_on_full_precision_base(tmp_path, tokens):
    model = lorakit.inject(quantize_model(tiny_llama(), blocksize=32), lorakit.LoraSpec(r=2, kind="dora"))
    randomize_dora(model)
    lorakit.save_adapter(model, tmp_path)
    fp32 = tiny_llama()
    lorakit.load_adapter(fp32, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(fp32(tokens).logits, peft_model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_merge_weights_pure_function_merges_dora_like_the_model():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraSpec(r=3, alpha=7, targets=["c_attn", "c_fc"], kind="dora"))
    randomize_dora(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    adapter, scales = {}, {}
    for path, layer in lora_layers(model):
        a = layer.adapters["default"]
        for name in ("lora_A", "lora_B", "magnitude"):
            adapter[f"{path}.{name}"] = getattr(a, name).detach()
        scales[path] = a.scale
    merged_sd = lorakit.merge_weights(base, adapter, scales, fan_in_fan_out=set(scales))
    lorakit.merge(model)
    for key, value in merged_sd.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_unload_keeps_only_the_named_adapters(tokens):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["v_proj"]), name="plain")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["v_proj"], kind="dora"), name="dora")
    randomize_dora(model)
    lorakit.set_active(model, ["plain"])
    expected = model(tokens).logits
    lorakit.set_active(model, ["plain", "dora"])
    plain = lorakit.merge_and_unload(model, names=["plain"])  # the active DoRA adapter is dropped, not in the way
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=1e-5, atol=1e-5)
