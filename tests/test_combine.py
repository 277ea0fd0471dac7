"""Combined adapters equal the explicit weighted sum of the deltas (and PEFT reads them)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.adapters.combine import combine
from lorakit.adapters.layer import lora_layers

WEIGHTS = {"a": 0.7, "b": -1.3}


def two_adapters() -> torch.nn.Module:
    """Different ranks, alphas, scalings and partly different targets (an embedding among them)."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=5, targets=["q_proj", "v_proj"],
                                           alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}), name="a")
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets=["v_proj", "down_proj", "embed_tokens"], rslora=True,
                                           rank_pattern={"down_proj": 3}), name="b")
    randomize_adapters(model)
    return model


def expected_delta(layer, weights: dict[str, float]) -> torch.Tensor:
    return sum(w * layer.adapters[n].delta_weight().detach().double() for n, w in weights.items()
               if n in layer.adapters)


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(method, tokens, tmp_path):
    model = two_adapters()
    combine(model, WEIGHTS, "ab", method=method)
    paths = []
    for path, layer in lora_layers(model):
        paths.append(path)
        torch.testing.assert_close(layer.adapters["ab"].delta_weight().double(), expected_delta(layer, WEIGHTS),
                                   rtol=1e-5, atol=1e-5)
        assert layer.adapters["ab"].r == sum(layer.adapters[n].r for n in WEIGHTS if n in layer.adapters)
    assert sorted(paths) == sorted(model.lorakit_specs["ab"].targets)
    assert sorted(lorakit.active_adapters(model)) == ["a", "b"]  # added inactive
    lorakit.set_active(model, ["ab"])
    expected = model(tokens).logits
    # the saved adapter (per-layer ranks as patterns) reproduces it in PEFT and in lorakit
    lorakit.save_adapter(model, tmp_path, name="ab")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_svd_truncates_the_exact_sum():
    model = two_adapters()
    combine(model, WEIGHTS, "full", method="svd", rank=16)  # >= every combined rank: exact
    combine(model, WEIGHTS, "low", method="svd", rank=2)
    for _, layer in lora_layers(model):
        exact = expected_delta(layer, WEIGHTS)
        torch.testing.assert_close(layer.adapters["full"].delta_weight().double(), exact, rtol=1e-5, atol=1e-5)
        low = layer.adapters["low"].delta_weight().double()
        assert layer.adapters["low"].r == 2
        s = torch.linalg.svdvals(exact)
        # the best rank-2 approximation: its error is the discarded singular values (Eckart-Young)
        torch.testing.assert_close(torch.linalg.matrix_norm(exact - low), s[2:].square().sum().sqrt(),
                                   rtol=1e-5, atol=1e-5)


def test_combine_refuses_what_it_cannot_do_exactly():
    model = two_adapters()
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"], kind="dora"), name="d")
    with pytest.raises(ValueError, match="'d' is a dora adapter"):
        combine(model, {"a": 1.0, "d": 1.0}, "x")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        combine(model, {"zz": 1.0}, "x")
    with pytest.raises(ValueError, match="rank=2 is for method='svd' only"):
        combine(model, WEIGHTS, "x", method="cat", rank=2)
    with pytest.raises(ValueError, match="must be non-empty, contain no '.', and be unused"):
        combine(model, WEIGHTS, "a")
