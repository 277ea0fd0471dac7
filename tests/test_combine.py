"""Combined adapters equal the explicit weighted sum of the deltas (and PEFT reads them)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.adapters.combine import combine
from lorakit.adapters.layer import lora_layers
from lorakit.adapters.state import adapters_of

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
    assert sorted(paths) == sorted(adapters_of(model).specs["ab"].targets)
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
    with pytest.raises(ValueError, match="rank=2 is for method='svd' or"):
        combine(model, WEIGHTS, "x", method="cat", rank=2)
    with pytest.raises(ValueError, match="must be non-empty, contain no '.', and be unused"):
        combine(model, WEIGHTS, "a")
    with pytest.raises(ValueError, match="density is required by"):
        combine(model, WEIGHTS, "x", method="ties")
    with pytest.raises(ValueError, match="density is required by"):
        combine(model, WEIGHTS, "x", method="linear", density=0.5)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        combine(model, WEIGHTS, "x", method="dare_linear", density=0.0)


# TIES / DARE, written out from the papers in plain torch (loops over entries' ranks, not topk)

def reference_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    order = torch.argsort(t.abs().reshape(-1), descending=True)
    kept = torch.zeros(t.numel(), dtype=torch.bool)
    kept[order[:k]] = True
    return torch.where(kept.view_as(t), t, torch.zeros_like(t))


def reference_disjoint_mean(tasks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(tasks)
    sign = torch.ones_like(total)
    sign[total < 0] = -1
    num = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for t, w in zip(tasks, weights, strict=True):
        agree = (t != 0) & (torch.sign(t) == sign)
        num += torch.where(agree, w * t, 0.0)
        count += agree
    return num / torch.maximum(count, torch.ones_like(count))


def reference_ties(tasks, weights, density):
    return reference_disjoint_mean([reference_trim(t, density) for t in tasks], weights)


def reference_dare(tasks, weights, density, masks, ties):
    dropped = [t * m / density for t, m in zip(tasks, masks, strict=True)]
    if ties:
        return reference_disjoint_mean(dropped, weights)
    return sum(w * t for t, w in zip(dropped, weights, strict=True))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_equal_the_formulas_on_the_deltas(method):
    model = two_adapters()
    density, seed = 0.4, 7
    combine(model, WEIGHTS, "full", method=method, density=density, seed=seed, rank=64)  # >= full rank: exact
    combine(model, WEIGHTS, "low", method=method, density=density, seed=seed, rank=2)
    g_state = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        names = [n for n in WEIGHTS if n in layer.adapters]
        tasks = [layer.adapters[n].delta_weight().detach().double() for n in names]
        weights = [WEIGHTS[n] for n in names]
        if method == "ties":
            expected = reference_ties(tasks, weights, density)
        else:  # the same draws as combine: layers in order, tasks in order, from one seeded generator
            masks = [torch.bernoulli(torch.full(t.shape, density, dtype=torch.float64), generator=g_state)
                     for t in tasks]
            expected = reference_dare(tasks, weights, density, masks, ties=method == "dare_ties")
        assert (expected != 0).any()
        torch.testing.assert_close(layer.adapters["full"].delta_weight().double(), expected, rtol=1e-5, atol=1e-5)
        low = layer.adapters["low"].delta_weight().double()
        s = torch.linalg.svdvals(expected)
        torch.testing.assert_close(torch.linalg.matrix_norm(expected - low), s[2:].square().sum().sqrt(),
                                   rtol=1e-5, atol=1e-5)


def test_dare_is_seeded_and_unbiased():
    model = two_adapters()
    combine(model, WEIGHTS, "s1", method="dare_linear", density=0.5, seed=1, rank=64)
    combine(model, WEIGHTS, "s1b", method="dare_linear", density=0.5, seed=1, rank=64)
    combine(model, WEIGHTS, "s2", method="dare_linear", density=0.5, seed=2, rank=64)
    _, layer = next(iter(lora_layers(model)))
    d = {n: layer.adapters[n].delta_weight().detach().double() for n in ("s1", "s1b", "s2")}
    assert torch.equal(d["s1"], d["s1b"])
    assert not torch.allclose(d["s1"], d["s2"])
    # density 1 drops nothing: exactly the weighted sum
    combine(model, WEIGHTS, "keep", method="dare_linear", density=1.0, rank=64)
    for _, layer in lora_layers(model):
        torch.testing.assert_close(layer.adapters["keep"].delta_weight().double(), expected_delta(layer, WEIGHTS),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_merge_functions_agree_with_peft_merge_utils(method):
    """Our per-tensor TIES/DARE against PEFT's (which add_weighted_adapter applies to the factors; we apply them
    to the deltas, see combine's docstring): same tensors, same density, same random stream."""
    from peft.utils import merge_utils

    from lorakit.adapters.combine import dare_merge, ties_merge

    torch.manual_seed(0)
    tasks = torch.randn(3, 12, 10, dtype=torch.float64)
    weights = torch.tensor([0.5, -1.2, 2.0], dtype=torch.float64)
    if method == "ties":
        ours = ties_merge(tasks, weights, 0.3)
        theirs = merge_utils.ties(list(tasks), weights, 0.3)
    else:
        ours = dare_merge(tasks, weights, 0.3, torch.Generator().manual_seed(5), ties=method == "dare_ties")
        torch.manual_seed(5)  # PEFT draws from the global generator, the same stream as a fresh seeded one
        theirs = getattr(merge_utils, method)(list(tasks), weights, 0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
