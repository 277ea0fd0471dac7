"""Adapter stacks: a child adapter on top of a parent is active with its whole chain, and its output is the
base plus the explicit sum of the chain's deltas (written here in plain torch); files record the parent."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.adapters.inject import adapter_chain, remove_adapter, set_parent
from lorakit.adapters.layer import lora_layers
from lorakit.adapters.state import adapters_of


def tree() -> torch.nn.Module:
    """root -> a -> b, and root -> c; different ranks, alphas and targets (b also on down_proj)."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets=["q_proj", "v_proj"]), name="root")
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=5, targets=["q_proj"]), name="a", parent="root")
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=2, targets=["v_proj", "down_proj"], rslora=True), name="b",
                   parent="a")
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets=["o_proj"]), name="c", parent="root")
    randomize_adapters(model)
    return model


def reference(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """The base with sum over `names` of scale * B A added to each weight, from the factors by hand."""
    base = tiny_llama()
    with torch.no_grad():
        for path, layer in lora_layers(model):
            for n in names:
                if n in layer.adapters:
                    ad, spec = layer.adapters[n], adapters_of(model).specs[n]
                    scale = spec.alpha / (ad.r ** 0.5 if spec.rslora else ad.r)
                    base.get_submodule(path).weight += scale * ad.lora_B @ ad.lora_A
    return base


@pytest.mark.parametrize(("activate", "chain"), [(["b"], ["root", "a", "b"]), (["c"], ["root", "c"]),
                                                 (["a"], ["root", "a"]), (["b", "c"], ["root", "a", "b", "c"]),
                                                 (["root"], ["root"])])
def test_activating_an_adapter_activates_its_chain(activate, chain, tokens):
    model = tree()
    lorakit.set_active(model, activate)
    assert lorakit.active_adapters(model) == chain
    torch.testing.assert_close(model(tokens).logits, reference(model, chain)(tokens).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(tokens).logits, reference(model, activate)(tokens).logits, atol=1e-4) \
        or activate == chain  # the chain really adds something
    lorakit.set_active(model, [])
    torch.testing.assert_close(model(tokens).logits, tiny_llama()(tokens).logits)


def test_injected_child_is_active_with_its_chain_and_relations_are_checked():
    model = tree()
    assert lorakit.active_adapters(model) == ["root", "a", "b", "c"]  # each inject adds an active adapter
    assert adapter_chain(model, "b") == ["root", "a", "b"]
    with pytest.raises(ValueError, match="would be a cycle"):
        set_parent(model, "root", "b")
    with pytest.raises(ValueError, match=r"'a' is the parent of \['b'\]"):
        remove_adapter(model, "a")
    with pytest.raises(ValueError, match="parent adapter 'zz' is not on the model"):
        lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"]), name="d", parent="zz")
    remove_adapter(model, "b")
    remove_adapter(model, "a")
    assert adapter_chain(model, "c") == ["root", "c"] and "b" not in adapters_of(model).parents
    set_parent(model, "c", None)  # unstacked: c alone
    lorakit.set_active(model, ["c"])
    assert lorakit.active_adapters(model) == ["c"]


def test_saved_child_records_its_parent_and_loads_back_as_a_stack(tmp_path, tokens):
    model = tree()
    for n in ("root", "a", "b"):
        lorakit.save_adapter(model, tmp_path / n, name=n)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["lorakit_parent"] == "a" and "lorakit_parent" not in json.loads(
        (tmp_path / "root" / "adapter_config.json").read_text())
    # PEFT ignores the key: it loads the child alone, base + the child's own delta
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b")
    torch.testing.assert_close(peft_model(tokens).logits, reference(model, ["b"])(tokens).logits,
                               rtol=1e-5, atol=1e-5)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="parent adapter 'a' is not on the model"):
        lorakit.load_adapter(fresh, tmp_path / "b", name="b")
    assert lorakit.active_adapters(fresh) == []  # refused before touching the model
    lorakit.load_adapter(fresh, tmp_path / "root", name="root")
    lorakit.load_adapter(fresh, tmp_path / "a", name="a")
    lorakit.load_adapter(fresh, tmp_path / "b", name="b")
    lorakit.set_active(fresh, ["b"])
    assert lorakit.active_adapters(fresh) == ["root", "a", "b"]
    torch.testing.assert_close(fresh(tokens).logits, reference(model, ["root", "a", "b"])(tokens).logits,
                               rtol=1e-5, atol=1e-5)
    # an explicit parent wins over the recorded one
    other = tiny_llama()
    lorakit.load_adapter(other, tmp_path / "root", name="root")
    lorakit.load_adapter(other, tmp_path / "b", name="b", parent="root")
    assert adapter_chain(other, "b") == ["root", "b"]


def test_store_loads_a_child_with_its_chain(tmp_path, tokens):
    model = tree()
    for n in ("root", "a", "b", "c"):
        lorakit.save_adapter(model, tmp_path / n, name=n)
    served = tiny_llama()
    with lorakit.AdapterStore(tmp_path, max_device=4) as store:
        store.activate(served, "b")
        assert sorted(adapters_of(served).specs) == ["a", "b", "root"]
        assert lorakit.active_adapters(served) == ["root", "a", "b"]
        torch.testing.assert_close(served(tokens).logits, reference(model, ["root", "a", "b"])(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
        store.activate(served, "c")  # root is shared, already there
        assert lorakit.active_adapters(served) == ["root", "c"]
        torch.testing.assert_close(served(tokens).logits, reference(model, ["root", "c"])(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
        store.detach(served, "a")  # takes b (stacked on a) off too
        assert sorted(adapters_of(served).specs) == ["c", "root"]
        assert sorted(store.on_model(served)) == ["c", "root"]
