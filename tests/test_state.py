"""The record of a model's adapters (adapters/state.py): one typed attribute holding the specs, the stacking
relation and the active set, kept in step with the layers by inject, load, set_active, remove and unload;
the parent goes to and comes back from adapter_config.json (adapters/metadata.py)."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.adapters.combine import combine
from lorakit.adapters.copies import module_copies
from lorakit.adapters.inject import adapted_modules, remove_adapter
from lorakit.adapters.state import ModelAdapters, adapters_of

ROOT = lorakit.LoraSpec(r=2, alpha=4, targets=["q_proj", "v_proj"])
CHILD = lorakit.LoraSpec(r=3, alpha=3, targets=["v_proj", "lm_head"], modules_to_save=["embed_tokens"])


def layer_active(model: torch.nn.Module) -> dict[str, list[str]]:
    """What each wrapper (and module copy) runs: the truth the record must agree with."""
    wrappers = {path: layer.active for path, layer in adapted_modules(model)}
    return {**wrappers, **{f"{path}.lora_copies": c.active for path, c in module_copies(model)}}


def expected_active(model: torch.nn.Module, names: list[str]) -> dict[str, list[str]]:
    wrappers = {path: [n for n in names if n in layer.adapters] for path, layer in adapted_modules(model)}
    return {**wrappers, **{f"{path}.lora_copies": [n for n in names if n in c.copies]
                           for path, c in module_copies(model)}}


def test_the_record_is_the_one_place_a_model_keeps_its_adapters():
    model = tiny_llama()
    lorakit.inject(model, ROOT, name="root")
    lorakit.inject(model, CHILD, name="child", parent="root")
    combine(model, {"root": 0.5}, "halved")  # added inactive
    assert [key for key in vars(model) if key.startswith("lorakit")] == ["lorakit_adapters"]
    assert adapters_of(model) == ModelAdapters(specs={"root": ROOT, "child": CHILD,
                                                      "halved": adapters_of(model).specs["halved"]},
                                               parents={"child": "root"}, active=["root", "child"])
    assert layer_active(model) == expected_active(model, ["root", "child"])
    lorakit.set_active(model, ["halved"])
    assert adapters_of(model).active == ["halved"] and layer_active(model) == expected_active(model, ["halved"])
    lorakit.set_active(model, ["child"])  # brings its parent
    assert adapters_of(model).active == ["root", "child"]
    assert layer_active(model) == expected_active(model, ["root", "child"])
    with pytest.raises(ValueError, match="parent of"):
        remove_adapter(model, "root")
    remove_adapter(model, "child")
    assert adapters_of(model) == ModelAdapters(specs={"root": ROOT, "halved": adapters_of(model).specs["halved"]},
                                               active=["root"])
    assert layer_active(model) == expected_active(model, ["root"])
    lorakit.merge_and_unload(model)
    assert adapters_of(model) == ModelAdapters()  # nothing left to record: every wrapper is gone
    assert not list(adapted_modules(model))


def test_the_parent_is_saved_and_loaded_back_into_the_record(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, ROOT, name="root")
    lorakit.inject(model, CHILD, name="child", parent="root")
    for name in ("root", "child"):
        lorakit.save_adapter(model, tmp_path / name, name=name)
    assert json.loads((tmp_path / "child" / "adapter_config.json").read_text())["lorakit_parent"] == "root"
    assert "lorakit_parent" not in json.loads((tmp_path / "root" / "adapter_config.json").read_text())
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "root", name="root")
    lorakit.set_active(fresh, [])
    lorakit.load_adapter(fresh, tmp_path / "child", name="child")  # its file names its parent
    record = adapters_of(fresh)
    assert record.parents == {"child": "root"} and record.active == ["root", "child"]
    assert layer_active(fresh) == expected_active(fresh, ["root", "child"])
    assert [record.specs[n].r for n in record.names] == [2, 3]


def test_a_parent_that_is_not_an_adapter_name_is_refused(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, ROOT, name="root")
    lorakit.save_adapter(model, tmp_path / "root", name="root")
    config_file = tmp_path / "root" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lorakit_parent": "a.b"}))
    with pytest.raises(lorakit.AdapterFileError, match="lorakit_parent must be an adapter name"):
        lorakit.read_adapter(tmp_path / "root")
