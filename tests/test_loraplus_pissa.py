"""LoRA+ parameter groups (against PEFT's), and PiSSA init and conversion (against the untouched base)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit.adapters.layer import lora_layers
from lorakit.adapters.loraplus import loraplus_param_groups
from lorakit.quant.optim import make_optimizer

# ----------------------------------------------------------------------------- LoRA+


def test_loraplus_groups_by_role():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraSpec(r=2, targets=["c_attn", "wte"], bias="all", kind="dora",
                                                         modules_to_save=["lm_head"]))
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, ratio=16, embedding_lr=5e-4,
                                                          weight_decay=0.1)}
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "A": (1e-3, 0.1), "B": (16e-3, 0.1), "B_no_decay": (16e-3, 0.0), "embedding": (5e-4, 0.1)}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    c_attn = model.transformer.h[0].attn.c_attn.adapters["default"]
    wte = model.transformer.wte.adapters["default"]
    assert id(c_attn.lora_A) in ids["A"] and id(c_attn.lora_B) in ids["B"] and id(c_attn.magnitude) in ids["B"]
    assert {id(wte.lora_A), id(wte.lora_B)} == ids["embedding"] and id(wte.magnitude) in ids["B"]
    assert id(model.lm_head.lora_copies.copies["default"].weight) in ids["A"]
    assert id(model.transformer.h[0].attn.c_attn.bias) in ids["B_no_decay"]
    # every trainable parameter is in exactly one group
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for optim in ("adamw", "adamw8bit"):  # the optimizers of the training loop take them as they are
        opt = make_optimizer(optim, list(groups.values()), lr=1e-3, weight_decay=0.1)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups.values()]


def group_sizes(groups: list[dict]) -> Counter:
    """{(lr, weight_decay): number of parameter elements}, to compare groupings across libraries."""
    sizes = Counter()
    for g in groups:
        sizes[(round(g["lr"], 12), g["weight_decay"])] += sum(p.numel() for p in g["params"])
    return +sizes


def test_loraplus_groups_match_peft():
    spec = dict(r=4, alpha=8, targets=["c_attn", "c_fc", "wte"], bias="all", kind="dora")
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"], bias="all", use_dora=True,
                  fan_in_fan_out=True)
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraSpec(**spec))
    ours = loraplus_param_groups(model, lr=2e-4, ratio=8, embedding_lr=1e-5, weight_decay=0.01)
    peft_opt = create_loraplus_optimizer(get_peft_model(tiny_gpt2(), LoraConfig(**config)), torch.optim.AdamW,
                                         lr=2e-4, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5,
                                         loraplus_weight_decay=0.01)
    assert group_sizes(ours) == group_sizes(peft_opt.param_groups)


def test_loraplus_rejects_bad_ratio():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    with pytest.raises(ValueError, match="ratio must be positive"):
        loraplus_param_groups(model, lr=1e-3, ratio=0)


# ----------------------------------------------------------------------------- PiSSA


def train_a_little(model, tokens, steps: int = 3) -> None:
    """A few optimizer steps, so the adapter moves away from its init."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("make", "kind", "rslora"), [(tiny_llama, "lora", False), (tiny_gpt2, "lora", True),
                                                     (tiny_llama, "dora", False)])
def test_pissa_init_keeps_output_and_converted_adapter_fits_untouched_base(make, kind, rslora, tokens, tmp_path):
    model = make()
    before = model(tokens).logits
    spec = lorakit.LoraSpec(r=4, alpha=8, targets="all-linear", init="pissa", kind=kind, rslora=rslora)
    lorakit.inject(model, spec)
    torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)
    # the adapter holds the top-r singular directions of W; the base keeps the residual
    path, layer = next(iter(lora_layers(model)))
    w = make().get_submodule(path).weight.detach()
    w = w.T if layer.kind == "conv1d" else w
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(layer.adapters["default"].delta_weight())[:4], s[:4])
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight_oi())[: len(s) - 4], s[4:], rtol=1e-4, atol=1e-5)
    train_a_little(model, tokens)
    model.eval()
    trained = model(tokens).logits
    assert not torch.allclose(trained, before, atol=1e-3)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, trained, rtol=1e-5, atol=1e-5)
    fresh = make()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(tokens).logits, trained, rtol=1e-5, atol=1e-5)

def test_pissa_converted_adapter_loads_in_lorakit_on_untouched_base(tokens, tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, init="pissa", rank_pattern={"v_proj": 2},
                                                          alpha_pattern={"q_proj": 3}))
    train_a_little(model, tokens)
    model.eval()
    trained = model(tokens).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(tokens).logits, trained, rtol=1e-5, atol=1e-5)


def test_pissa_saved_unconverted_is_rebuilt_on_load_by_lorakit_and_peft(tokens, tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, init="pissa"))
    train_a_little(model, tokens)
    model.eval()
    trained = model(tokens).logits
    lorakit.save_adapter(model, tmp_path, convert_pissa=False)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)  # redoes the SVD on the base, then loads the trained factors
    torch.testing.assert_close(fresh(tokens).logits, trained, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, trained, rtol=1e-5, atol=1e-5)


def test_pissa_matches_peft_init(tokens):
    ours = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, targets=["q_proj"], init="pissa"))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     init_lora_weights="pissa"))
    q_ours = ours.model.layers[1].self_attn.q_proj
    q_theirs = theirs.base_model.model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(q_ours.weight, q_theirs.base_layer.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_ours.adapters["default"].delta_weight(), q_theirs.get_delta_weight("default"),
                               rtol=1e-5, atol=1e-5)
